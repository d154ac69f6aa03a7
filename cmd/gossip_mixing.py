"""How fast gossip groups mix: rounds until every member is within a
tolerance of the swarm's mean, random groups (NoLoCo's, `gossip_groups`)
against grid groups (Moshpit SGD's, `grid_groups`), with the real group
functions and the exchange's own arithmetic (fp32: zeros, each member's
value added in the group's order, one division).

No failures and a fixed view: what the grouping alone buys. Each member
starts from one standard normal fp32 value per element; the spread is the
largest |x - mean| over members and elements, the mean taken in float64.

    python cmd/gossip_mixing.py --peers 16,64,256,1024 --sizes 2,4 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peerlearn.swarm.gossip import groups_for  # noqa: E402


def rounds_to(n: int, size: int, grouping: str, tol: float, cap: int, elems: int,
              seed: int) -> dict:
    ids = [f"{i:032x}" for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, elems, generator=g)  # row i: member ids[i]
    mean = x.double().mean(0)
    row = {m: i for i, m in enumerate(ids)}
    spreads = []
    for r in range(cap):
        spread = float((x.double() - mean).abs().max())
        spreads.append(spread)
        if spread <= tol:
            return {"rounds": r, "spreads": spreads}
        new = x.clone()
        for group in groups_for(grouping, ids, r, seed, size):
            idx = [row[m] for m in group]
            out = torch.zeros(elems)
            for i in idx:
                out.add_(x[i])
            new[idx] = out.div_(len(idx))
        x = new
    return {"rounds": None, "spreads": spreads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="16,64,256,1024")
    ap.add_argument("--sizes", default="2,4")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="spread to reach (fp32 values: 1e-6 is rounding)")
    ap.add_argument("--cap", type=int, default=200)
    ap.add_argument("--elems", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for n in map(int, a.peers.split(",")):
        for size in map(int, a.sizes.split(",")):
            for grouping in ("random", "grid"):
                runs = [rounds_to(n, size, grouping, a.tol, a.cap, a.elems, s)
                        for s in range(a.seeds)]
                got = [r["rounds"] for r in runs]
                line = {"peers": n, "size": size, "grouping": grouping, "tol": a.tol,
                        "rounds": got, "cap": a.cap,
                        "spread_after_log_size_n": [
                            r["spreads"][min(len(r["spreads"]) - 1, _log(n, size))]
                            for r in runs]}
                print(json.dumps(line) if a.json else
                      f"N={n:5d} group {size} {grouping:6s}: rounds to {a.tol:g}: {got}",
                      flush=True)


def _log(n: int, size: int) -> int:
    d = 1
    while size ** d < n:
        d += 1
    return d


if __name__ == "__main__":
    main()
