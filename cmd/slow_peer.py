"""A slower peer for cmd/unequal_experiment.py: an ordinary `peerlearn run`
peer except that every inner step takes FACTOR times as long (issue 18,
"peers of unequal speed"), and its report says where its tokens went.

    python cmd/slow_peer.py --factor 3 run --algo diloco ...
    python cmd/slow_peer.py --factor 3 --steps 160 run --algo diloco --steps 480 ...
    python cmd/slow_peer.py --factor 1 --tree /tmp/peerlearn-60f3ff1 run ...

Everything from the `run` token on is `peerlearn run`'s own argv.

The padding. peerlearn.algorithms.training.train times each inner step from
before the batch is drawn to after `optimizer.step()` and the scheduler step
(its `compute_s`; `compute_utilisation` = compute_s / wall_s). This wrapper
replaces the task it is handed by one whose `loss` notes the time it is
called (the step's forward starts) and whose inner optimizer's `step`, after
the real one, sleeps (FACTOR - 1) x the time since then: the forward, the
backward and the optimizer step, measured on every step (so the padding
follows the step's own speed when the machine is busier or idler). The sleep
is inside the timed region, so it counts as compute, as a slower GPU would
be busy, not idle: a 3x slower peer that never waits shows a utilisation
near 1, like a fast one. The sleep gives its core to the other peers, where a
slow GPU would not: on a machine with fewer cores than peers (2 for 4 here)
the fast peers run faster while it sleeps, in every run with it alike.
FACTOR 1 pads nothing.

The tally (any FACTOR): the report printed at the end gains `"unequal"`:
the tokens this peer trained on that went into a round that applied
(applied_tokens), that a state replacement threw away (dropped_tokens: the
round went on without it, StateReplaced), and that were trained after its
last applied round and never sent (tail_tokens); the rounds it took part in;
the seconds of padding. Counted by wrapping DiLoCo.step (the tokens a True
return carried) and OuterLoop.replaced_by_swarm.

--pad spin: instead of sleeping, keep the core busy for that long (small
matrix products, which release the GIL): a slow GPU does not hand its
device to the other peers, and on a machine with fewer cores than peers a
sleeping peer hands them its core, so the fast peers speed up while it
sleeps and the slow one is more than FACTOR x slower than they are (3.8x
for FACTOR 3 with 4 peers on 2 cores, docs/algorithms.md); spinning keeps every peer's share of
the cores as in a run without a slow one.

--steps: this peer's inner steps instead of the run's --steps (run_demo
gives every peer the same; a slower peer given 1/FACTOR of them ends with
the others). --stop-below N: once this peer heard N peers alive (itself
included, in the last round or not), stop training (at the next inner step,
then report as usual) when fewer are left (a peer that finished leaves at
once): the run ends for everyone when its first peer is done, instead of the
last ones training on, and applying rounds, alone. --tree: import
peerlearn from that source tree (a snapshot of one commit, with the built
_native module copied in) instead of the installed editable one, so a sweep
is not changed by edits made to the working tree while it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_tree(tree: str | None) -> None:
    """Makes `import peerlearn` load from `tree` (before anything imported
    it): the editable install's redirecting finder goes, the tree goes first
    on the path. Without a tree, the repository this file is in."""
    if tree is None:
        sys.path.insert(0, str(REPO))
        return
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not type(f).__name__.startswith("ScikitBuild")]
    sys.path.insert(0, str(Path(tree).resolve()))


def spin(seconds: float) -> None:
    """Keeps this core busy for `seconds` (torch releases the GIL in mm, so
    the peer's daemon thread runs as it would during a real step)."""
    import torch

    a = torch.ones(64, 64)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        torch.mm(a, a)


def heard_alive(peer) -> int:
    """Peers this one hears alive, itself included, in the view or not (the
    view is the last round's participants: a peer left out of a round is not
    in it, though it trains on). Reads the daemon's round core on its loop:
    internals, which a harness may read and the runtime does not offer."""
    def read() -> int:
        core, now = peer.daemon.core, time.monotonic()
        return 1 + sum(1 for p in core.last_heard if p != core.me.id and core.alive(p, now))
    return peer._on_loop(read)


def install(factor: float, tally: dict, *, pad: str = "sleep", stop_below: int = 0) -> None:
    """Wraps training.train (pads the task's steps) and DiLoCo's outer step
    (counts where the tokens went); see the module's docstring."""
    from peerlearn.algorithms import diloco, training

    train = training.train
    made: list = []

    def padded_train(peer, task, algo, hp, **kw):
        started: list[float] = []

        def loss(model, batch):
            started[:] = [time.monotonic()]
            return task.loss(model, batch)

        def inner_optimizer(params):
            opt = task.inner_optimizer(params)
            real = opt.step  # bound; the LR scheduler wraps ours in turn

            def step(self, *a, **k):
                out = real(*a, **k)
                if factor > 1 and started:
                    extra = (factor - 1) * (time.monotonic() - started[0])
                    (spin if pad == "spin" else time.sleep)(extra)
                    tally["padded_s"] += extra
                return out
            opt.step = types.MethodType(step, opt)
            return opt

        stop, seen = kw.get("stop"), {"full": False, "checked": 0.0}

        def stopping() -> bool:
            if stop is not None and stop():
                return True
            if tally["stopped_early"] or not stop_below:
                return tally["stopped_early"]
            if time.monotonic() - seen["checked"] >= 1.0:  # a loop round trip: not every step
                seen["checked"] = time.monotonic()
                live = heard_alive(peer)
                seen["full"] = seen["full"] or live >= stop_below
                tally["stopped_early"] = seen["full"] and live < stop_below
            return tally["stopped_early"]

        slow = dataclasses.replace(task, loss=loss, inner_optimizer=inner_optimizer)
        report = train(peer, slow, algo, hp, **{**kw, "stop": stopping})
        if made:
            tally["tail_tokens"] = made[-1]._tokens
        report["unequal"] = dict(tally)
        return report

    init, step, replaced = (diloco.DiLoCo.__init__, diloco.DiLoCo.step,
                            diloco.OuterLoop.replaced_by_swarm)

    def counted_init(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    def counted_step(self, tokens: float = 0) -> bool:
        carried = self._tokens + tokens
        took = step(self, tokens)
        if took:
            tally["applied_tokens"] += carried
            tally["rounds"] += 1
        return took

    def counted_replaced(self) -> None:
        tally["dropped_tokens"] += getattr(self, "_tokens", 0.0)
        tally["dropped_steps"] += self.local_steps
        replaced(self)

    training.train = padded_train
    diloco.DiLoCo.__init__ = counted_init
    diloco.DiLoCo.step = counted_step
    diloco.OuterLoop.replaced_by_swarm = counted_replaced


def main(argv: list[str]) -> None:
    if "run" not in argv:
        raise SystemExit("usage: slow_peer.py --factor F [--pad sleep|spin] [--steps N] "
                         "[--stop-below N] [--tree DIR] "
                         "run [peerlearn run flags]")
    at = argv.index("run")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--factor", type=float, required=True,
                   help="each inner step takes this many times its own time (1: unchanged)")
    p.add_argument("--steps", type=int, default=None,
                   help="this peer's inner steps (replaces run's --steps)")
    p.add_argument("--pad", choices=("sleep", "spin"), default="sleep")
    p.add_argument("--stop-below", type=int, default=0,
                   help="stop once fewer than this many live members are left (0: never)")
    p.add_argument("--tree", default=None, help="import peerlearn from this source tree")
    args = p.parse_args(argv[:at])
    if args.factor < 1:
        raise SystemExit("--factor must be at least 1")
    run = list(argv[at:])
    if args.steps is not None:
        run = [a for i, a in enumerate(run)
               if a != "--steps" and (i == 0 or run[i - 1] != "--steps")]
        run += ["--steps", str(args.steps)]
    use_tree(args.tree)
    install(args.factor, {"factor": args.factor, "pad": args.pad, "padded_s": 0.0,
                          "applied_tokens": 0.0, "dropped_tokens": 0.0, "dropped_steps": 0,
                          "tail_tokens": 0.0, "rounds": 0, "stopped_early": False},
            pad=args.pad, stop_below=args.stop_below)
    from peerlearn.cli import app

    sys.argv = [sys.argv[0], *run]
    app.main()


if __name__ == "__main__":
    main(sys.argv[1:])
