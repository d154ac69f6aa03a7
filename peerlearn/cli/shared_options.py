"""What more than one command takes: the options `run`, `demo` and `swarm`
share, and the checks of their values made before anything loads torch (a
mistake is reported in one line at once, not after seconds of imports)."""

from __future__ import annotations

from typing import Optional

import typer

PROGRESS_OPTION = typer.Option(
    "auto", "--progress", metavar="MODE",
    help="auto | rich | plain. auto: a live table on a terminal when rich is installed "
         "(pip install 'peerlearn[progress]'), else one prefixed line per event.")

# Spelled out so `peerlearn --help` does not load torch; a test keeps it equal to CODEC_NAMES.
# swarm.aggregate.RULES, spelled out: that module loads torch, this one must not
# before a mistake is reported (tests/test_cli_mistakes.py checks they agree).
AGGREGATE_RULES = ("mean", "centered-clip", "trimmed-mean", "median")
AGGREGATE_HELP = ("How a round combines the peers' contributions: mean (the ring all-reduce), "
                  "or a rule a few dishonest peers cannot steer: centered-clip, trimmed-mean, "
                  "median (every contribution is all-gathered: N/2 times the bytes; "
                  "docs/swarm.md). The same at every peer.")
CODEC_HELP = "All-reduce codec: none, int8, int4, fp16, bf16, fp8, e3m0, int8-minmax, int4-minmax."
# The gossip runs' options (noloco, gossip, gossip-vc), shared by `run` and `demo`.
GOSSIP = {
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
    "grouping": typer.Option("random", help="Gossip: how groups are drawn each round: random "
                                            "(NoLoCo's), or grid (Moshpit SGD's: every peer "
                                            "holds the exact mean after ceil(log_group N) "
                                            "rounds on a full grid)."),
    "gossip_timeout": typer.Option(30.0, help="Gossip: seconds an exchange waits for its "
                                              "group before it is skipped."),
}

# Algorithms that share nothing until an outer step, every --H inner steps.
OUTER_STEP_ALGOS = ("diloco", "streaming", "async", "eager", "noloco", "gossip", "gossip-vc")


# Withdrawn from --algo (docs/algorithms.md, "Async and eager DiLoCo: withdrawn");
# the library classes (peerlearn.algorithms.AsyncDiLoCo, EagerDiLoCo) stay.
_WITHDRAWN = {
    "async": "from a warm start one-step-delayed DiLoCo ended 115 % above one peer alone "
             "(22 % with a look-ahead start)",
    "eager": "from a warm start eager DiLoCo ended 52 % above one peer alone",
}


def check_steps(ctx: typer.Context, algo: str, steps: int, H: int) -> None:
    """A withdrawn algorithm, or a run shorter than one outer step (it shares
    nothing), is refused in one line."""
    if algo in _WITHDRAWN:
        param = next(p for p in ctx.command.params if p.name == "algo")
        raise typer.BadParameter(
            f"{algo} is withdrawn: {_WITHDRAWN[algo]}; see docs/algorithms.md (\"Async and "
            f"eager DiLoCo: withdrawn\"). Use diloco or streaming", ctx=ctx, param=param)
    if algo in OUTER_STEP_ALGOS and steps < H:
        param = next(p for p in ctx.command.params if p.name == "steps")
        raise typer.BadParameter(
            f"{steps} ends before the first outer step (one every --H {H} inner steps), so "
            f"this peer would share nothing with the swarm: give --steps {H} or more, or a "
            f"smaller --H", ctx=ctx, param=param)


def parse_settings(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set wants KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def parse_wan(spec: Optional[str]) -> Optional[tuple[float, float]]:
    """"RTT_MS,MBIT" -> (rtt_ms, mbit); None stays None."""
    if not spec:
        return None
    try:
        rtt, rate = spec.split(",")
        return float(rtt), float(rate)
    except ValueError:
        raise typer.BadParameter(f"--wan wants RTT_MS,MBIT, not {spec!r}") from None
