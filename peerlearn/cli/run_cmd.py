"""`peerlearn run`: one peer of a swarm, training a task with an algorithm (or
the synthetic workload). The command checks its options and builds the
command line a joiner must repeat; the peer itself is cli.train's or
cli.daemon's."""

from __future__ import annotations

from typing import Optional

import typer

from peerlearn.cli import options
from peerlearn.cli.logs import LOG_FORMAT_OPTION, LOG_LEVEL_OPTION, QUIET_OPTION, VERBOSE_OPTION
from peerlearn.cli.shared_options import (
    AGGREGATE_HELP,
    AGGREGATE_RULES,
    CODEC_HELP,
    GOSSIP,
    check_steps,
    parse_settings,
)

# The deployment files' metrics port (peerlearn.cli.metrics.DEFAULT_PORT, kept
# equal by a test; spelled out so `--help` does not import prometheus_client).
DEFAULT_METRICS_PORT = 9400


def run(
    ctx: typer.Context,
    config: Optional[str] = options.CONFIG_OPTION,
    listen: str = typer.Option(
        "127.0.0.1:7400", help="HOST:PORT the control socket binds (0.0.0.0: every interface; "
                               "then --advertise, or --join to derive it)."),
    advertise: Optional[str] = typer.Option(
        None, help="HOST[:PORT] the other peers reach this one at (default: the --listen "
                   "address); its host is advertised for the data port too (behind NAT: the "
                   "public address, with both ports forwarded; or 'dial-back': nobody can "
                   "reach this peer, it opens every connection itself)."),
    join: Optional[str] = typer.Option(
        None, help="HOST:PORT of any live member (PEER_ID@HOST:PORT in an allowlist swarm); "
                   "omit to found a new swarm."),
    relay: Optional[int] = typer.Option(
        None, help="Serve a relay on this port (0: any free one) for peers that cannot dial "
                   "each other (--advertise dial-back on both sides)."),
    relay_via: Optional[str] = typer.Option(
        None, help="HOST:PORT[,HOST:PORT...] of members' relays: with --advertise dial-back, "
                   "links to other dial-back peers go through the first that answers (give "
                   "every such peer the same list)."),
    no_hole_punch: bool = typer.Option(
        False, "--no-hole-punch",
        help="Relay every link between two dial-back peers (by default they are punched "
             "through both NATs first, the relay only introducing them, and relayed if that "
             "fails)."),
    swim: bool = typer.Option(
        False, "--swim",
        help="Also run SWIM membership (probes, O(1) messages a second) beside the "
             "heartbeats: logged at debug and exported (peerlearn_swim_*); rounds do not use "
             "it yet (issue 19)."),
    data_dir: str = typer.Option("./peerlearn-data", help="Identity, checkpoints."),
    secret_file: Optional[str] = typer.Option(
        None, help="File holding the swarm secret (else $PEERLEARN_SECRET)."),
    data_port: int = typer.Option(0, help="Data-plane port (0: any free one)."),
    algo: str = typer.Option(
        "diloco", help="diloco | streaming | ddp | noloco | gossip | gossip-vc, "
                       "or 'synthetic' (no model: the swarm's own test workload)."),
    task: Optional[str] = typer.Option(
        None, help="MODULE:FUNCTION or FILE.py:FUNCTION returning a peerlearn Task "
                   "(default: the built-in byte-level language model)."),
    task_set: list[str] = typer.Option(
        [], "--set", help="KEY=VALUE passed to the task (repeat), e.g. --set n_layer=2."),
    steps: int = typer.Option(1000, min=1, help="Inner steps to train, then leave."),
    shard: str = typer.Option(
        "auto", help="auto: the whole corpus in an order of this peer's own (seeded by its "
        "identity, so a restart goes on where it stopped; peers need no numbering). RANK/WORLD: "
        "shard RANK of WORLD disjoint shards."),
    seed: int = typer.Option(0, help="Data order seed (the model's comes from the task)."),
    H: int = typer.Option(50, "--H", help="Inner steps per outer step."),
    outer_every_s: Optional[float] = typer.Option(
        None, help="DiLoCo: an outer step every this many seconds of training instead of "
                   "every --H inner steps; each peer runs as many as fit, and pseudo-gradients "
                   "count by their tokens (peers of unequal speed lose no work)."),
    P: int = typer.Option(4, "--P", help="Streaming: fragments."),
    tau: int = typer.Option(1, help="Streaming: inner steps a fragment's reduction overlaps."),
    alpha: float = typer.Option(0.5, help="Streaming: weight of the local params when merging."),
    outer_lr: float = typer.Option(0.7, help="Outer Nesterov learning rate."),
    momentum: float = typer.Option(0.9, help="Outer Nesterov momentum."),
    group: int = GOSSIP["group"], noloco_momentum: float = GOSSIP["noloco_momentum"],
    gamma: float = GOSSIP["gamma"], merge_at: str = GOSSIP["merge_at"],
    noloco_nesterov: bool = GOSSIP["noloco_nesterov"],
    independent_init: bool = GOSSIP["independent_init"],
    gossip_timeout: float = GOSSIP["gossip_timeout"],
    grouping: str = GOSSIP["grouping"],
    progress_every: int = typer.Option(25, help="A progress line every this many steps."),
    wait_peers: int = typer.Option(0, help="Start training once this many peers are heard "
                                           "from (0: at once)."),
    numel: int = typer.Option(1 << 18, help="Synthetic workload: parameters."),
    compute_s: float = typer.Option(0.5, help="Synthetic workload: seconds of 'training' a round."),
    codec: str = typer.Option("none", help=CODEC_HELP),
    aggregate: str = typer.Option("mean", help=AGGREGATE_HELP),
    dead_after: float = typer.Option(3.0, help="Seconds of silence before a peer is evicted."),
    join_timeout: float = typer.Option(
        60.0, help="Give up (exit 1) when no member answers --join within this many seconds "
                   "(0: keep trying). A member refusing the handshake (another secret) ends "
                   "the wait at once."),
    metrics: str = typer.Option(f"127.0.0.1:{DEFAULT_METRICS_PORT}",
                                help="HOST:PORT for Prometheus metrics (port 0: any; 'off')."),
    allowlist: Optional[str] = typer.Option(
        None, help="File of admitted Ed25519 public keys (hex, one per line) instead of a "
                   "secret."),
    log_level: str = LOG_LEVEL_OPTION,
    verbose: int = VERBOSE_OPTION,
    quiet: int = QUIET_OPTION,
    log_format: str = LOG_FORMAT_OPTION,
) -> None:
    """Start a peer that trains a task with an algorithm, as one member of a swarm."""
    check_steps(ctx, algo, steps, 1 if outer_every_s else H)  # before anything loads torch
    from peerlearn.cli import credentials, daemon, logs
    from peerlearn.wire.codecs import codec_from_name

    logs.setup(log_level, log_format, verbose, quiet)

    try:
        codec_id = codec_from_name(codec)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--codec") from None
    if aggregate not in AGGREGATE_RULES:
        raise typer.BadParameter(f"{aggregate!r} is not one of {', '.join(AGGREGATE_RULES)}",
                                 param_hint="--aggregate")
    secret, keys = credentials.read_credentials(secret_file, allowlist)
    # What a joiner must pass as well: the settings every peer of a run shares
    # (a gossip run's peers refuse a swarm whose settings differ from theirs).
    shared = ["--algo", algo, "--codec", codec,
              *(["--aggregate", aggregate] if aggregate != "mean" else [])]
    if algo == "synthetic":
        shared += ["--numel", str(numel)]
    else:
        shared += ["--H", str(H), "--outer-lr", str(outer_lr), "--momentum", str(momentum)]
        if outer_every_s is not None:
            shared += ["--outer-every-s", str(outer_every_s)]
        if algo == "streaming":
            shared += ["--P", str(P), "--tau", str(tau), "--alpha", str(alpha)]
        if algo in ("noloco", "gossip", "gossip-vc"):  # training.GOSSIP_ALGORITHMS (no torch here)
            shared += ["--group", str(group), "--noloco-momentum", str(noloco_momentum),
                       "--gamma", str(gamma), "--merge-at", merge_at,
                       "--gossip-timeout", str(gossip_timeout), "--grouping", grouping,
                       *(["--independent-init"] if independent_init else []),
                       *(["--noloco-nesterov"] if noloco_nesterov else [])]
        shared += [*(["--task", task] if task else []),
                   *[a for pair in task_set for a in ("--set", pair)]]

    def join_cmd(peer_id: str, control: str) -> str:
        return daemon.join_command(peer_id, control, secret_swarm=secret is not None,
                                   secret_file=secret_file, allowlist_file=allowlist,
                                   settings=shared)

    if algo != "synthetic":
        from peerlearn.algorithms.training import ALGORITHMS, Hyper
        from peerlearn.cli import train

        if algo not in ALGORITHMS:
            raise typer.BadParameter(f"--algo must be one of {', '.join(ALGORITHMS)} or "
                                     f"synthetic, not {algo!r}")
        train.run_training(
            listen, join, data_dir, secret, algo=algo, task_spec=task,
            task_args=parse_settings(task_set),
            hyper=Hyper(H=H, outer_lr=outer_lr, momentum=momentum, P=P, tau=tau, alpha=alpha,
                        group=group, noloco_momentum=noloco_momentum, gamma=gamma,
                        noloco_nesterov=noloco_nesterov,
                        merge_at=_merge_at(merge_at), independent_init=independent_init,
                        gossip_timeout=gossip_timeout, grouping=grouping,
                        outer_every_s=outer_every_s),
            steps=steps, shard=shard, seed=seed, codec=codec_id, aggregate=aggregate,
            data_port=data_port, dead_after=dead_after,
            metrics=None if metrics == "off" else metrics, allowlist=keys,
            join_timeout=join_timeout or None, progress_every=progress_every,
            wait_peers=wait_peers, advertise=advertise, join_cmd=join_cmd,
            relay=relay, relay_via=relay_via, hole_punch=not no_hole_punch, swim=swim)
        return
    daemon.run_peer(listen, join, data_dir, secret, numel=numel,
                    compute_s=compute_s, codec=codec_id, aggregate=aggregate,
                    data_port=data_port, dead_after=dead_after,
                    metrics=None if metrics == "off" else metrics,
                    allowlist=keys, join_timeout=join_timeout or None, advertise=advertise,
                    join_cmd=join_cmd, relay=relay, relay_via=relay_via,
                    hole_punch=not no_hole_punch, swim=swim)


def _merge_at(spec: str) -> int:
    """--merge-at: off (0), end (-1) or an inner step N >= 1."""
    if spec in ("off", "end"):
        return 0 if spec == "off" else -1
    if not spec.isdigit() or int(spec) < 1:
        raise typer.BadParameter(f"off, end or an inner step, not {spec!r}",
                                 param_hint="--merge-at")
    return int(spec)
