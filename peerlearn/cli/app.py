"""The `peerlearn` command line. Subcommands stay thin: they parse options and
call into the library, printing JSON where a machine reads the output.

Every option can also come from a `PEERLEARN_<FLAG>` environment variable or a
TOML file (`--config FILE`); flags win over the environment, the environment
over the file, the file over defaults."""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Optional

import typer

from peerlearn import __version__
from peerlearn.cli import options
from peerlearn.cli.logs import LOG_FORMAT_OPTION, LOG_LEVEL_OPTION, QUIET_OPTION, VERBOSE_OPTION

# numpy is optional (a plain install has none), and torch says so on import in
# a warning every peer would print; the runtime never hands torch a numpy array.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

HELP = " ".join("""peerlearn trains one model together on machines scattered over the
internet, each with a few GPUs (or just CPUs): every peer trains on its own data and the
peers synchronise over slow, unreliable links; peers may come and go at any time. Try it
on this machine with `peerlearn demo`; for a real swarm, make a secret with `peerlearn
secret new`, start the first peer with `peerlearn run`, and run the join command it
prints on each other machine. Every option can also be set as a PEERLEARN_<FLAG>
environment variable or in a TOML file given with --config (flags > environment > file >
defaults).""".split())

app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)
bench = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints JSON with its baseline.")
app.add_typer(bench, name="bench")
secret_app = typer.Typer(no_args_is_help=True, help="Swarm secrets.")
app.add_typer(secret_app, name="secret")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peerlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """peerlearn: decentralised training over the internet."""


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        typer.echo(f"{key}: {json.dumps(value)}")


def _wan(spec: Optional[str]) -> Optional[tuple[float, float]]:
    """"RTT_MS,MBIT" -> (rtt_ms, mbit); None stays None."""
    if not spec:
        return None
    try:
        rtt, rate = spec.split(",")
        return float(rtt), float(rate)
    except ValueError:
        raise typer.BadParameter(f"--wan wants RTT_MS,MBIT, not {spec!r}") from None


@bench.command("codec")
def bench_codec(
    numel: int = typer.Option(64 * 2**20, help="Elements of the fp32 test tensor."),
    threads: Optional[int] = typer.Option(None, help="Threads (default: all cores)."),
    repeat: int = typer.Option(3, help="Timed repetitions; the best is reported."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Encode/decode GB/s per codec beside PyTorch and a memory copy, in one run."""
    from peerlearn.bench import codec

    _emit(codec.run(numel=numel, threads=threads, repeat=repeat), as_json)


@bench.command("stream")
def bench_stream(
    conns: str = typer.Option("1,2,4,8,16", help="Connection counts to measure."),
    mbytes: int = typer.Option(256, help="Megabytes per timed transfer."),
    wan: Optional[str] = typer.Option(
        None, help="RTT_MS,MBIT: also measure over the emulated wide-area path (needs root)."
    ),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Striped-link throughput per connection count, beside one raw socket."""
    from peerlearn.bench import stream

    counts = [int(c) for c in conns.split(",") if c]
    wan_spec = _wan(wan)
    _emit(stream.run(conns=counts, mbytes=mbytes, wan=wan_spec), as_json)


@bench.command("allreduce")
def bench_allreduce(
    peers: int = typer.Option(4, help="Peers, each its own process (and host under --wan)."),
    numel: int = typer.Option(100_000_000, help="Elements of the fp32 tensor."),
    codec: str = typer.Option(
        "none", help="Wire codecs, comma-separated (e.g. none,int8): each timed in the same run."
    ),
    wan: Optional[str] = typer.Option(
        None, help="RTT_MS,MBIT: run over the emulated wide-area path (needs root)."
    ),
    repeat: int = typer.Option(3, help="Timed runs after one warm-up; the best is reported."),
    conns: Optional[int] = typer.Option(
        None, help="Connections per link (default: 2 on loopback, 8 over --wan)."
    ),
    piece_elems: int = typer.Option(
        1 << 22, help="Elements per pipelined piece of a ring segment (1 = one piece per step)."
    ),
    lanes: Optional[int] = typer.Option(
        None, help="Parts all-reduced at once, each over its own connections (default: conns)."),
    gloo: bool = typer.Option(True, "--gloo/--no-gloo", help="Also time torch.distributed gloo."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Ring all-reduce time and bus bandwidth beside gloo's, in one run."""
    from peerlearn.bench import allreduce

    wan_spec = _wan(wan)
    _emit(allreduce.run(peers=peers, numel=numel, codecs=tuple(codec.split(",")), wan=wan_spec,
                        repeat=repeat, conns=conns, piece_elems=piece_elems, lanes=lanes,
                        gloo=gloo), as_json)


@bench.command("statesize")
def bench_statesize(
    sizes: str = typer.Option(
        "64M,512M,2G", help="State sizes in bytes of fp32 (K, M, G: binary), comma-separated."),
    duration: float = typer.Option(120.0, help="Seconds of steady rounds measured per size."),
    compute_s: float = typer.Option(
        0.5, help="Synthetic compute per round (left out of the round time)."),
    join: bool = typer.Option(True, "--join/--no-join",
                              help="Then time a 4th peer joining the running swarm."),
    mem_floor: float = typer.Option(
        2.0, help="GiB of MemAvailable below which every peer is killed at once."),
    logs: Optional[str] = typer.Option(None, help="Copy every peer's log into this directory."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """3 synthetic peers per state size: round time beside the ring bound, loop stalls,
    peak RSS, checkpoint and join times."""
    from peerlearn.bench import statesize

    try:
        size_list = statesize.parse_sizes(sizes)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--sizes") from None
    _emit(statesize.run(size_list, duration=duration, compute_s=compute_s, join=join,
                        mem_floor_gib=mem_floor, logs_dir=logs), as_json)


@bench.command("wanround")
def bench_wanround(
    wan: str = typer.Option("100,100", help="RTT_MS,MBIT of the emulated path (needs root)."),
    peers: int = typer.Option(4, help="Peers, each on its own emulated host."),
    numel: int = typer.Option(262_144, help="fp32 elements of the synthetic state (1 MiB)."),
    rounds: int = typer.Option(20, help="Complete rounds measured, after the swarm settled."),
    slot_s: float = typer.Option(2.0, help="Contributions handed over at multiples of this "
                                 "(all peers at once; 0: as soon as each applied)."),
    baseline_repeat: int = typer.Option(10, help="Bare ring runs per mode."),
    no_slow_start_after_idle: bool = typer.Option(
        False, "--no-slow-start-after-idle", help="EXPERIMENT: then measure as many rounds "
        "again with net.ipv4.tcp_slow_start_after_idle=0 in every host."),
    nodelay: bool = typer.Option(False, "--nodelay", help="EXPERIMENT: then as many rounds "
                                 "again with TCP_NODELAY on the data connections."),
    cc: Optional[str] = typer.Option(None, help="EXPERIMENT: congestion control of the data "
                                     "connections (e.g. cubic; default: the machine's)."),
    mtu: int = typer.Option(65000, help="EXPERIMENT: the emulator's MTU."),
    logs: Optional[str] = typer.Option(None, help="Copy every peer's log and events here."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """A small all-reduce round among synthetic peers over the emulated WAN: end to end in
    seconds and RTTs, where the round trips go, beside the bare ring and the RTT."""
    from peerlearn.bench import wanround

    _emit(wanround.run(peers=peers, numel=numel, wan=_wan(wan), rounds=rounds, slot_s=slot_s,
                       baseline_repeat=baseline_repeat, cc=cc, mtu=mtu, logs_dir=logs,
                       no_slow_start_after_idle=no_slow_start_after_idle, nodelay=nodelay),
          as_json)


# The deployment files' metrics port (peerlearn.cli.metrics.DEFAULT_PORT, kept
# equal by a test; spelled out so `--help` does not import prometheus_client).
DEFAULT_METRICS_PORT = 9400
WATCH_DEFAULT_S = 2.0
PROGRESS_OPTION = typer.Option(
    "auto", "--progress", metavar="MODE",
    help="auto | rich | plain. auto: a live table on a terminal when rich is installed "
         "(pip install 'peerlearn[progress]'), else one prefixed line per event.")

# Spelled out so `peerlearn --help` does not load torch; a test keeps it equal to CODEC_NAMES.
# swarm.aggregate.RULES, spelled out: that module loads torch, this one must not
# before a mistake is reported (tests/test_cli_mistakes.py checks they agree).
AGGREGATE_RULES = ("mean", "centered-clip", "trimmed-mean", "median")
_AGGREGATE_HELP = ("How a round combines the peers' contributions: mean (the ring all-reduce), "
                   "or a rule a few dishonest peers cannot steer: centered-clip, trimmed-mean, "
                   "median (every contribution is all-gathered: N/2 times the bytes; "
                   "docs/swarm.md). The same at every peer.")
_CODEC_HELP = "All-reduce codec: none, int8, int4, fp16, bf16, fp8, e3m0, int8-minmax, int4-minmax."
# The gossip runs' options (noloco, gossip, gossip-vc), shared by `run` and `demo`.
_GOSSIP = {
    "group": typer.Option(2, help="Gossip: peers per averaging group."),
    "noloco_momentum": typer.Option(0.5, help="NoLoCo: momentum α (its β is --outer-lr)."),
    "gamma": typer.Option(0.7, help="NoLoCo: pull γ toward the group's mean."),
    "noloco_nesterov": typer.Option(False, "--noloco-nesterov",
                                    help="NoLoCo: Nesterov momentum (as the paper names α) "
                                         "instead of the authors' code's heavy-ball."),
    "merge_at": typer.Option("off", help="Gossip: one agreed all-reduce of the parameters: "
                                         "off, end, or after inner step N."),
    "independent_init": typer.Option(False, "--independent-init",
                                     help="Gossip: each peer starts from its own "
                                          "initialisation (the task's, permuted per peer)."),
    "gossip_timeout": typer.Option(30.0, help="Gossip: seconds an exchange waits for its "
                                              "group before it is skipped."),
}


@secret_app.command("new")
def secret_new(
    out: Optional[str] = typer.Option(
        None, "--out", help="Write it to this file (mode 0600, atomically) instead of printing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
) -> None:
    """A fresh 256-bit swarm secret (base64url), for --secret-file or $PEERLEARN_SECRET."""
    from pathlib import Path

    from peerlearn.state.atomic import write_atomic
    from peerlearn.transport.swarm_secret import new_secret

    secret = new_secret()
    if out is None:
        typer.echo(secret)
        return
    # Replacing a swarm's secret file would lock its peer out of the swarm.
    if Path(out).exists() and not force:
        typer.echo(f"{out} exists; pass --force to replace it", err=True)
        raise typer.Exit(1)
    write_atomic(out, [secret.encode() + b"\n"], mode=0o600)


# Algorithms that share nothing until an outer step, every --H inner steps.
_OUTER_STEP_ALGOS = ("diloco", "streaming", "async", "eager", "noloco", "gossip", "gossip-vc")


# Withdrawn from --algo (docs/algorithms.md, "Async and eager DiLoCo: withdrawn");
# the library classes (peerlearn.algorithms.AsyncDiLoCo, EagerDiLoCo) stay.
_WITHDRAWN = {
    "async": "from a warm start one-step-delayed DiLoCo ended 115 % above one peer alone "
             "(22 % with a look-ahead start)",
    "eager": "from a warm start eager DiLoCo ended 52 % above one peer alone",
}


def _check_steps(ctx: typer.Context, algo: str, steps: int, H: int) -> None:
    """A withdrawn algorithm, or a run shorter than one outer step (it shares
    nothing), is refused in one line."""
    if algo in _WITHDRAWN:
        param = next(p for p in ctx.command.params if p.name == "algo")
        raise typer.BadParameter(
            f"{algo} is withdrawn: {_WITHDRAWN[algo]}; see docs/algorithms.md (\"Async and "
            f"eager DiLoCo: withdrawn\"). Use diloco or streaming", ctx=ctx, param=param)
    if algo in _OUTER_STEP_ALGOS and steps < H:
        param = next(p for p in ctx.command.params if p.name == "steps")
        raise typer.BadParameter(
            f"{steps} ends before the first outer step (one every --H {H} inner steps), so "
            f"this peer would share nothing with the swarm: give --steps {H} or more, or a "
            f"smaller --H", ctx=ctx, param=param)


@app.command("run")
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
    group: int = _GOSSIP["group"], noloco_momentum: float = _GOSSIP["noloco_momentum"],
    gamma: float = _GOSSIP["gamma"], merge_at: str = _GOSSIP["merge_at"],
    noloco_nesterov: bool = _GOSSIP["noloco_nesterov"],
    independent_init: bool = _GOSSIP["independent_init"],
    gossip_timeout: float = _GOSSIP["gossip_timeout"],
    progress_every: int = typer.Option(25, help="A progress line every this many steps."),
    wait_peers: int = typer.Option(0, help="Start training once this many peers are heard "
                                           "from (0: at once)."),
    numel: int = typer.Option(1 << 18, help="Synthetic workload: parameters."),
    compute_s: float = typer.Option(0.5, help="Synthetic workload: seconds of 'training' a round."),
    codec: str = typer.Option("none", help=_CODEC_HELP),
    aggregate: str = typer.Option("mean", help=_AGGREGATE_HELP),
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
    _check_steps(ctx, algo, steps, 1 if outer_every_s else H)  # before anything loads torch
    from peerlearn.cli import daemon, logs
    from peerlearn.wire.codecs import codec_from_name

    logs.setup(log_level, log_format, verbose, quiet)

    try:
        codec_id = codec_from_name(codec)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--codec") from None
    if aggregate not in AGGREGATE_RULES:
        raise typer.BadParameter(f"{aggregate!r} is not one of {', '.join(AGGREGATE_RULES)}",
                                 param_hint="--aggregate")
    secret, keys = daemon.read_credentials(secret_file, allowlist)
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
                       "--gossip-timeout", str(gossip_timeout),
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
            task_args=_settings(task_set),
            hyper=Hyper(H=H, outer_lr=outer_lr, momentum=momentum, P=P, tau=tau, alpha=alpha,
                        group=group, noloco_momentum=noloco_momentum, gamma=gamma,
                        noloco_nesterov=noloco_nesterov,
                        merge_at=_merge_at(merge_at), independent_init=independent_init,
                        gossip_timeout=gossip_timeout, outer_every_s=outer_every_s),
            steps=steps, shard=shard, seed=seed, codec=codec_id, aggregate=aggregate,
            data_port=data_port, dead_after=dead_after,
            metrics=None if metrics == "off" else metrics, allowlist=keys,
            join_timeout=join_timeout or None, progress_every=progress_every,
            wait_peers=wait_peers, advertise=advertise, join_cmd=join_cmd,
            relay=relay, relay_via=relay_via, hole_punch=not no_hole_punch)
        return
    daemon.run_peer(listen, join, data_dir, secret, numel=numel,
                    compute_s=compute_s, codec=codec_id, aggregate=aggregate,
                    data_port=data_port, dead_after=dead_after,
                    metrics=None if metrics == "off" else metrics,
                    allowlist=keys, join_timeout=join_timeout or None, advertise=advertise,
                    join_cmd=join_cmd, relay=relay, relay_via=relay_via,
                    hole_punch=not no_hole_punch)


def _merge_at(spec: str) -> int:
    """--merge-at: off (0), end (-1) or an inner step N >= 1."""
    if spec in ("off", "end"):
        return 0 if spec == "off" else -1
    if not spec.isdigit() or int(spec) < 1:
        raise typer.BadParameter(f"off, end or an inner step, not {spec!r}",
                                 param_hint="--merge-at")
    return int(spec)


def _settings(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set wants KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


# The demo's defaults, from the runs in docs/algorithms.md ("The demo's warm start").
DEMO_WARMUP = 300
WARM_OUTER_LR = 1.0  # the warm-start grid's choice for the DiLoCo family
COLD_OUTER_LR = 0.7  # the paper's (and NoLoCo's β, the authors' code)
_DILOCO_ALGOS = ("diloco", "streaming")
_GOSSIP_ALGOS = ("noloco", "gossip", "gossip-vc")


def _demo_say():
    """The demo launcher's own lines ("[demo] ..."), before its peers start."""
    from peerlearn.cli import output

    def say(text: str) -> None:
        output.write_line(sys.stderr.fileno(), f"[demo] {text}")
    return say


@app.command("demo", help="Train the task with N local peers on this machine, then print "
                          "validation loss, tokens, bytes and compute utilisation per peer. "
                          "First one process pretrains the task alone for --warmup steps "
                          "(cached for the next demo) and every peer starts from that model; "
                          "one more process trains alone from it beside the peers, and the "
                          "summary compares the swarm's loss with that single peer's.")
def demo(
    ctx: typer.Context,
    config: Optional[str] = options.CONFIG_OPTION,
    algo: str = typer.Option("diloco", help="diloco | streaming | ddp | local "
                                            "(no communication) | noloco | gossip | gossip-vc."),
    peers: int = typer.Option(4, min=1, help="Local peer processes."),
    steps: int = typer.Option(500, min=1, help="Inner steps each peer trains."),
    task: Optional[str] = typer.Option(None, help="MODULE:FUNCTION (default: built-in)."),
    warmup: int = typer.Option(
        DEMO_WARMUP, min=0, help="Steps one process pretrains the task alone before the peers "
                                 "start from it (0: from random weights). Cached under "
                                 "$PEERLEARN_CACHE_DIR or ~/.cache/peerlearn."),
    reference: bool = typer.Option(
        True, "--reference/--no-reference",
        help="Beside the peers, one peer alone (--algo local) trains the same steps from the "
             "same start: the summary's single_peer_val_loss."),
    H: Optional[int] = typer.Option(
        None, "--H", help="Inner steps per outer step (default 50; streaming: the largest "
                          "multiple of --P up to 50)."),
    P: int = typer.Option(4, "--P", help="Streaming: fragments."),
    tau: int = typer.Option(1, help="Streaming: inner steps a reduction overlaps."),
    alpha: float = typer.Option(0.5, help="Streaming: weight of the local params when merging."),
    outer_lr: Optional[float] = typer.Option(
        None, help=f"Outer Nesterov learning rate (default: {WARM_OUTER_LR} for diloco and "
                   f"streaming from the warm-up, else {COLD_OUTER_LR})."),
    momentum: float = typer.Option(0.9, help="Outer Nesterov momentum."),
    seed: int = typer.Option(0, help="Data order seed (the model's init comes from the task)."),
    group: int = _GOSSIP["group"], noloco_momentum: float = _GOSSIP["noloco_momentum"],
    gamma: float = _GOSSIP["gamma"], merge_at: str = _GOSSIP["merge_at"],
    noloco_nesterov: bool = _GOSSIP["noloco_nesterov"],
    independent_init: bool = _GOSSIP["independent_init"],
    gossip_timeout: float = _GOSSIP["gossip_timeout"],
    codec: str = typer.Option("none", help=_CODEC_HELP),
    aggregate: str = typer.Option("mean", help=_AGGREGATE_HELP),
    task_set: list[str] = typer.Option([], "--set", help="KEY=VALUE for the task (repeat)."),
    wan: Optional[str] = typer.Option(
        None, help="RTT_MS,MBIT: each peer on its own emulated host over that path "
                   "(network namespaces; needs root)."),
    progress_every: int = typer.Option(25, help="A progress line every this many steps."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    progress: str = PROGRESS_OPTION,
    log_level: str = LOG_LEVEL_OPTION,
    verbose: int = VERBOSE_OPTION,
    quiet: int = QUIET_OPTION,
) -> None:
    """`peerlearn demo` (its help is the decorator's: one string, since typer
    keeps a docstring's line breaks)."""
    from peerlearn.cli import logs, output, train

    log_flags = logs.flags(log_level, "text", verbose, quiet)[:2]
    if H is None:  # streaming needs H % P == 0
        H = max(P, 50 // P * P) if algo == "streaming" and P > 0 else 50
    _check_steps(ctx, algo, steps, H)
    settings = _settings(task_set)
    wan_spec = _wan(wan)  # mistakes in one line before the warm-up, not after it
    output.choose(progress)
    started = time.monotonic()
    say = _demo_say()
    warm = None
    if warmup and (algo in _GOSSIP_ALGOS and independent_init):
        say("no warm-up: --independent-init gives each peer its own initialisation")
    elif warmup:
        from peerlearn.cli import warmup as warm_mod
        from peerlearn.tasks import TaskError

        try:
            why_not = warm_mod.supported(task, settings)
            if why_not is None:
                path, warm = warm_mod.warm_start(task, settings, seed=seed, steps=warmup,
                                                 say=say)
                task_set = [*task_set, f"init={path}"]
            else:
                say(f"no warm-up: {why_not}")
        except TaskError as e:
            raise SystemExit(f"peerlearn: {e}") from None
        except KeyboardInterrupt:
            typer.echo("peerlearn demo: interrupted during the warm-up (nothing cached)",
                       err=True)
            raise typer.Exit(130) from None
    if outer_lr is None:
        outer_lr = WARM_OUTER_LR if warm is not None and algo in _DILOCO_ALGOS else COLD_OUTER_LR
    reference = reference and algo != "local"  # a lone `local` peer is the reference itself
    start = (f"from a warm start ({warm['steps']} steps, "
             f"{'cached' if warm['cached'] else 'trained just now'})" if warm is not None
             else "from random weights")
    say(f"{peers} peers train with {algo} for {steps} steps each {start}"
        + (f", H {H}" if algo in _OUTER_STEP_ALGOS else "")
        + (f", outer lr {outer_lr:g}" if algo in (*_DILOCO_ALGOS, "noloco") else "")
        + ("; beside them one peer alone (--algo local) trains the same steps from the same "
           "start: the reference the summary compares with" if reference else ""))
    extra = ["--H", str(H), "--P", str(P), "--tau", str(tau), "--alpha", str(alpha),
             "--outer-lr", str(outer_lr), "--momentum", str(momentum), "--seed", str(seed),
             "--codec", codec, "--aggregate", aggregate,
             "--progress-every", str(progress_every), "--group", str(group),
             "--noloco-momentum", str(noloco_momentum),
             "--gamma", str(gamma), "--merge-at", merge_at,
             "--gossip-timeout", str(gossip_timeout),
             *(["--independent-init"] if independent_init else []),
             *(["--noloco-nesterov"] if noloco_nesterov else [])]
    for pair in task_set:
        extra += ["--set", pair]
    ref_flags = None
    if reference:
        ref_flags = ["--seed", str(seed), "--progress-every", str(progress_every)]
        for pair in task_set:
            ref_flags += ["--set", pair]
    summary = train.run_demo(algo, peers, steps, task, extra, wan_spec, progress=progress,
                             log_flags=log_flags, reference=ref_flags)
    summary["warm_start"] = warm
    summary["demo_wall_s"] = round(time.monotonic() - started, 1)  # the warm-up included
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if key not in ("peers_report", "single_peer_report"):
            typer.echo(f"{key}: {json.dumps(_rounded(value))}")
    if summary.get("single_peer_val_loss") and summary["val_loss"] is not None:
        rel = summary["vs_single_peer"]
        done = {r.get("inner_steps") for r in summary["peers_report"]}
        alone = summary["single_peer_report"].get("inner_steps")
        same = (f"after the same {alone} steps from the same start" if done == {alone} else
                f"(not comparable: interrupted, the peers after {'/'.join(sorted(map(str, done)))} "
                f"steps, the lone peer after {alone})")
        typer.echo(f"{algo}, {peers} peers: validation loss {summary['val_loss']:.4f}, "
                   f"{abs(rel) * 100:.1f} % {'below' if rel < 0 else 'above'} one peer alone "
                   f"({summary['single_peer_val_loss']:.4f}) {same}")


def _rounded(value):
    """Floats to 4 significant digits (a summary for people; --json keeps them whole)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


@app.command("swarm")
def swarm(
    config: Optional[str] = options.CONFIG_OPTION,
    peers: int = typer.Option(4, min=1, help="Peers to start on loopback."),
    duration: Optional[float] = typer.Option(
        None, help="Stop after this many seconds and print the status (default: until Ctrl-C)."),
    base_port: int = typer.Option(7400, help="Control port of the first peer; the rest follow."),
    numel: int = typer.Option(1 << 18, help="Synthetic workload: parameters."),
    compute_s: float = typer.Option(0.5, help="Synthetic workload: seconds per round."),
    codec: str = typer.Option("none", help=_CODEC_HELP),
    progress: str = PROGRESS_OPTION,
    log_level: str = LOG_LEVEL_OPTION,
    verbose: int = VERBOSE_OPTION,
    quiet: int = QUIET_OPTION,
) -> None:
    """Start a local swarm and show its rounds; its data directory is removed at the end."""
    from peerlearn.cli import daemon, logs

    daemon.run_swarm(peers, duration, base_port, numel, compute_s, codec, progress=progress,
                     log_flags=logs.flags(log_level, "text", verbose, quiet)[:2])


@app.command("status")
def status(
    config: Optional[str] = options.CONFIG_OPTION,
    target: str = typer.Argument(
        ..., help="HOST:PORT of a peer's control socket (PEER_ID@HOST:PORT: allowlist swarm)."),
    secret_file: Optional[str] = typer.Option(
        None, help="File holding the swarm secret (else $PEERLEARN_SECRET)."),
    allowlist: Optional[str] = typer.Option(
        None, help="An allowlist swarm's key file; then --data-dir names a listed identity."),
    data_dir: Optional[str] = typer.Option(
        None, help="Data directory whose identity is on the allowlist (with --allowlist)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    watch: Optional[float] = typer.Option(
        None, "--watch", metavar="[SECONDS]",
        help=f"Ask again every SECONDS ({WATCH_DEFAULT_S:g} if omitted) until Ctrl-C."),
) -> None:
    """The swarm as one peer sees it: each peer's id, address, role, step and state hash."""
    from peerlearn.cli import daemon

    secret, keys = daemon.read_credentials(secret_file, allowlist)
    if watch is not None and watch <= 0:
        raise typer.BadParameter("SECONDS must be above 0", param_hint="--watch")
    def show(first: bool) -> None:
        rows = daemon.query_status(target, secret, data_dir=data_dir, allowlist=keys)
        if watch is not None and not as_json and sys.stdout.isatty():
            typer.echo("\x1b[H\x1b[2J", nl=False)  # a terminal shows the latest table only
        if as_json:
            typer.echo(json.dumps(rows, indent=None if watch is not None else 2))
            return
        if watch is not None:
            typer.echo(time.strftime("%H:%M:%S ") + f"{target}: {len(rows)} peers")
        for r in rows:
            typer.echo(f"{r['id'][:12]}  {r['control']:<21} {r['role']:<11} "
                       f"step {r['step']:<6} {r['state_hash']}")
        verdict = quorum_line(rows)
        if verdict:
            typer.echo(verdict)
        if first or sys.stdout.isatty():
            # What equal hashes prove differs by algorithm; say it where they are shown.
            typer.echo("state hash: the agreed state (parity: equal at equal steps). DiLoCo "
                       "family: outer params and optimizer. Gossip runs (noloco, gossip, "
                       "gossip-vc): step, configuration and merged params only; each peer's "
                       "own params differ by design.")

    if watch is None:
        show(True)
        return
    first = True
    try:
        while True:
            show(first)
            first = False
            time.sleep(watch)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends, wherever it lands: not an error


def _one_line(e: Exception, ctx) -> str:
    """A click error as one line: the command, then what is wrong, naming where
    a bad value came from (flag, environment variable or config file)."""
    param = getattr(e, "param", None)
    if param is not None and ctx is not None and type(e).__name__ == "BadParameter":
        text = f"invalid value for {options.where_from(ctx, param)}: {e.message}"
    else:
        text = e.format_message()
    prog = ctx.command_path if ctx is not None else "peerlearn"
    text = " ".join(str(text).split())
    if text.startswith("Invalid value for "):
        text = "i" + text[1:]
    return f"{prog}: {text}"


def quorum_line(rows: list[dict]) -> str | None:
    """What `status` says when the view has lost its majority: lost members
    (unreachable, still in the view) too many for a quorum. The rows are one
    peer's view: members that left with Ctrl-C are not in it."""
    in_view = [r for r in rows if r["role"] in ("coordinator", "member", "lost")]
    lost = [r for r in in_view if r["role"] == "lost"]
    if not lost or 2 * (len(in_view) - len(lost)) > len(in_view):
        return None
    names = ", ".join(f"{r['id'][:8]} ({r['control']})" for r in lost)
    return (f"NO MAJORITY: {len(lost)} of the view's {len(in_view)} members are unreachable "
            f"({names}); no round can apply until enough come back. Start them again, or see "
            f"the ERROR line in a survivor's log for how to go on without them.")


def main() -> None:
    """The console script: a usage mistake is one plain line on stderr and
    exit code 2 (click's convention), whatever the terminal and whether rich is
    installed; help and everything else as typer shows it."""
    command = typer.main.get_command(app)
    options.wire_environment(command)
    args = sys.argv[1:]
    if args[:1] == ["status"]:
        args = options.optional_values(args, {"--watch": f"{WATCH_DEFAULT_S:g}"})
    try:
        code = command.main(args=args, prog_name="peerlearn", standalone_mode=False)
    except options.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            # No command given: the help, as usual (rich has printed it already).
            if e.format_message().strip():
                e.show()
        else:
            typer.echo(_one_line(e, getattr(e, "ctx", None)), err=True)
        sys.exit(e.exit_code)
    except typer.Abort as e:
        interrupted = isinstance(e.__cause__, KeyboardInterrupt)
        typer.echo("peerlearn: interrupted" if interrupted else "peerlearn: aborted", err=True)
        sys.exit(130 if interrupted else 1)
    if code == 130:  # Ctrl-C that no command caught (typer's Exit(130))
        typer.echo("peerlearn: interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
