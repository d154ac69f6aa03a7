"""How fast the coordinator finds a member that poisons every round, in the
round simulator (tests/swarm_sim.py, simulated time; docs/swarm.md, "Members
that lie about the state or poison rounds").

    python cmd/trace_poisoner.py            # one line per swarm size
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from swarm_sim import Sim  # noqa: E402


def trace(n: int, bad: str) -> tuple[float, int, list[str]]:
    sim = Sim(n)
    sim.run(3)
    sim.peers[bad].poison = True
    t0, core = sim.now, sim.peers["p00"].core
    while not core.excluded_now(bad, sim.now) and sim.now < t0 + 30:
        sim.run(sim.now + 0.05)
    applied = sum(1 for t, kind, p, *_ in sim.events if t > t0 and kind == "apply" and p == "p00")
    wrong = [p for p in sim.peers if p != bad and core.excluded_now(p, sim.now)]
    return sim.now - t0, applied, wrong


if __name__ == "__main__":
    for n, bad in ((5, "p04"), (7, "p05"), (9, "p03"), (16, "p11")):
        took, applied, wrong = trace(n, bad)
        print(f"{n} peers: {bad} excluded after {took:.2f} simulated s, "
              f"{applied} rounds applied meanwhile, honest peers excluded: {wrong}")
