"""`peerlearn demo` and `peerlearn swarm`: whole swarms launched on this
machine, to try peerlearn without a second one. The demo trains the task with
N peers from a warm start and compares them with one peer alone; the swarm
runs the synthetic workload until Ctrl-C."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer

from peerlearn.cli import options
from peerlearn.cli.logs import LOG_LEVEL_OPTION, QUIET_OPTION, VERBOSE_OPTION
from peerlearn.cli.shared_options import (
    AGGREGATE_HELP,
    CODEC_HELP,
    GOSSIP,
    OUTER_STEP_ALGOS,
    PROGRESS_OPTION,
    check_steps,
    parse_settings,
    parse_wan,
)

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


# `demo`'s help, given where app.py registers it: one string, since typer keeps
# a docstring's line breaks.
DEMO_HELP = ("Train the task with N local peers on this machine, then print validation loss, "
             "tokens, bytes and compute utilisation per peer. First one process pretrains the "
             "task alone for --warmup steps (cached for the next demo) and every peer starts "
             "from that model; one more process trains alone from it beside the peers, and the "
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
    group: int = GOSSIP["group"], noloco_momentum: float = GOSSIP["noloco_momentum"],
    gamma: float = GOSSIP["gamma"], merge_at: str = GOSSIP["merge_at"],
    noloco_nesterov: bool = GOSSIP["noloco_nesterov"],
    independent_init: bool = GOSSIP["independent_init"],
    gossip_timeout: float = GOSSIP["gossip_timeout"],
    grouping: str = GOSSIP["grouping"],
    codec: str = typer.Option("none", help=CODEC_HELP),
    aggregate: str = typer.Option("mean", help=AGGREGATE_HELP),
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
    """`peerlearn demo` (its help: DEMO_HELP)."""
    from peerlearn.cli import logs, output, train

    log_flags = logs.flags(log_level, "text", verbose, quiet)[:2]
    if H is None:  # streaming needs H % P == 0
        H = max(P, 50 // P * P) if algo == "streaming" and P > 0 else 50
    check_steps(ctx, algo, steps, H)
    settings = parse_settings(task_set)
    wan_spec = parse_wan(wan)  # mistakes in one line before the warm-up, not after it
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
        + (f", H {H}" if algo in OUTER_STEP_ALGOS else "")
        + (f", outer lr {outer_lr:g}" if algo in (*_DILOCO_ALGOS, "noloco") else "")
        + ("; beside them one peer alone (--algo local) trains the same steps from the same "
           "start: the reference the summary compares with" if reference else ""))
    extra = ["--H", str(H), "--P", str(P), "--tau", str(tau), "--alpha", str(alpha),
             "--outer-lr", str(outer_lr), "--momentum", str(momentum), "--seed", str(seed),
             "--codec", codec, "--aggregate", aggregate,
             "--progress-every", str(progress_every), "--group", str(group),
             "--noloco-momentum", str(noloco_momentum),
             "--gamma", str(gamma), "--merge-at", merge_at,
             "--gossip-timeout", str(gossip_timeout), "--grouping", grouping,
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


def swarm(
    config: Optional[str] = options.CONFIG_OPTION,
    peers: int = typer.Option(4, min=1, help="Peers to start on loopback."),
    duration: Optional[float] = typer.Option(
        None, help="Stop after this many seconds and print the status (default: until Ctrl-C)."),
    base_port: int = typer.Option(7400, help="Control port of the first peer; the rest follow."),
    numel: int = typer.Option(1 << 18, help="Synthetic workload: parameters."),
    compute_s: float = typer.Option(0.5, help="Synthetic workload: seconds per round."),
    codec: str = typer.Option("none", help=CODEC_HELP),
    progress: str = PROGRESS_OPTION,
    log_level: str = LOG_LEVEL_OPTION,
    verbose: int = VERBOSE_OPTION,
    quiet: int = QUIET_OPTION,
) -> None:
    """Start a local swarm and show its rounds; its data directory is removed at the end."""
    from peerlearn.cli import local_swarm, logs

    local_swarm.run_swarm(peers, duration, base_port, numel, compute_s, codec, progress=progress,
                          log_flags=logs.flags(log_level, "text", verbose, quiet)[:2])
