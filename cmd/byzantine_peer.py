"""A Byzantine peer for cmd/byzantine_experiment.py: an ordinary `peerlearn
run` peer (it trains, applies every agreed round, stays in parity) except that
the pseudo-gradient it contributes to each outer all-reduce is replaced.

    python cmd/byzantine_peer.py --attack sign-flip run --algo diloco ...
    python cmd/byzantine_peer.py --attack alie --n 7 --f 2 run --algo diloco ...

Everything from the `run` token on is `peerlearn run`'s own argv. Attacks, on
each contributed tensor d (the DiLoCo token weight, if any, is left alone):

  sign-flip  -scale * d (scale 10)
  scale      scale * d (scale 1e30)
  nan        every value NaN
  noise      d + N(0, (scale * std(d))^2), std per tensor (scale 10)
  alie       d - z * sigma, coordinate-wise ("a little is enough", Baruch et
             al. 2019): sigma = |d - the previous round's mean| (0 on the
             first round), z = Phi^-1((n - s) / n), s = floor(n/2 + 1) - f

Only contributions made with an `apply` callback are changed (DiLoCo's outer
steps); the swarm's start barrier (an all-reduce of zeros, no apply) is not.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

WEIGHT = "#weight"  # peerlearn.algorithms.diloco.WEIGHT: the divisor of a weighted mean
ATTACKS = ("sign-flip", "scale", "nan", "noise", "alie")
DEFAULT_SCALE = {"sign-flip": 10.0, "scale": 1e30, "noise": 10.0}
log = logging.getLogger("peerlearn.byzantine")


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019, Algorithm 3: the largest shift (in honest standard
    deviations) that still leaves the attackers' value inside the majority."""
    s = math.floor(n / 2 + 1) - f
    return statistics.NormalDist().inv_cdf((n - s) / n)


class Attacker:
    """Turns an honest contribution into the attack's; remembers the last
    agreed mean (ALIE's estimate of where the honest peers are)."""

    def __init__(self, attack: str, scale: float, z: float, seed: int):
        self.attack, self.scale, self.z = attack, scale, z
        self.gen = torch.Generator().manual_seed(seed)
        self.prev_mean: dict[str, torch.Tensor] = {}
        self.rounds = 0

    def tensor(self, name: str, d: torch.Tensor) -> torch.Tensor:
        d = d.detach().to(torch.float32)
        if self.attack == "sign-flip":
            return d * -self.scale
        if self.attack == "scale":
            return d * self.scale
        if self.attack == "nan":
            return torch.full_like(d, float("nan"))
        if self.attack == "noise":
            std = float(d.std()) if d.numel() > 1 else float(d.abs().mean())
            return d + torch.randn(d.shape, generator=self.gen) * (self.scale * std)
        prev = self.prev_mean.get(name)
        if prev is None or prev.shape != d.shape:
            return d.clone()  # sigma = 0 on the first round
        return d - self.z * (d - prev).abs()

    def contribute(self, tensors):
        self.rounds += 1
        if self.rounds == 1:
            log.warning("attacker: %s (scale %g, z %.3f) on every outer contribution",
                        self.attack, self.scale, self.z)
        if isinstance(tensors, torch.Tensor):
            return self.tensor("", tensors).to(tensors.dtype)
        return {n: t if n == WEIGHT else self.tensor(n, t).to(t.dtype)
                for n, t in tensors.items()}

    def watch(self, apply: Callable) -> Callable:
        """apply, unchanged, after noting the round's mean (it runs on the
        daemon's thread; DiLoCo waits for it before its next contribution)."""
        def watched(state, mean):
            items = {"": mean} if isinstance(mean, torch.Tensor) else mean
            self.prev_mean = {n: t.detach().to(torch.float32).clone()
                              for n, t in items.items() if n != WEIGHT}
            return apply(state, mean)
        return watched


def install(attacker: Attacker) -> None:
    """Wraps Peer.all_reduce and Peer.all_reduce_async. all_reduce calls
    all_reduce_async itself: a thread-local depth keeps one contribution
    from being attacked twice."""
    from peerlearn.swarm.api import Peer

    sync, async_ = Peer.all_reduce, Peer.all_reduce_async
    inside = threading.local()

    def attacked(tensors, apply):
        if apply is None or getattr(inside, "depth", 0):
            return tensors, apply
        if not isinstance(tensors, torch.Tensor | Mapping):
            return tensors, apply
        return attacker.contribute(tensors), attacker.watch(apply)

    # Other keywords (donate, ...) pass through: the API grows them.
    def all_reduce(self, tensors, *, apply=None, timeout=None, **kw):
        tensors, apply = attacked(tensors, apply)
        inside.depth = getattr(inside, "depth", 0) + 1
        try:
            return sync(self, tensors, apply=apply, timeout=timeout, **kw)
        finally:
            inside.depth -= 1

    def all_reduce_async(self, tensors, *, apply=None, **kw):
        tensors, apply = attacked(tensors, apply)
        return async_(self, tensors, apply=apply, **kw)

    Peer.all_reduce = all_reduce
    Peer.all_reduce_async = all_reduce_async


def main(argv: list[str]) -> None:
    if "run" not in argv:
        raise SystemExit("usage: byzantine_peer.py --attack NAME [...] run [peerlearn run flags]")
    at = argv.index("run")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attack", choices=ATTACKS, required=True)
    p.add_argument("--scale", type=float, default=None,
                   help="sign-flip/scale: the factor; noise: noise std over the update's std")
    p.add_argument("--n", type=int, default=7, help="alie: peers in the swarm")
    p.add_argument("--f", type=int, default=2, help="alie: attackers among them")
    p.add_argument("--attack-seed", type=int, default=0, help="noise: the generator's seed")
    args = p.parse_args(argv[:at])
    scale = args.scale if args.scale is not None else DEFAULT_SCALE.get(args.attack, 1.0)
    # The repository root on the path: this file runs as a script from cmd/.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    install(Attacker(args.attack, scale, alie_z(args.n, args.f), args.attack_seed))
    from peerlearn.cli import app

    sys.argv = [sys.argv[0], *argv[at:]]
    app.main()


if __name__ == "__main__":
    main(sys.argv[1:])
