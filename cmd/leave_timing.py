"""Seconds from a Ctrl-C of one peer of a 2-peer swarm to the survivor's next
new round (real processes on loopback, the synthetic workload; issue 15).

    python cmd/leave_timing.py [TRIALS]
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_swarm import Swarm  # noqa: E402


def trial() -> tuple[float, float]:
    sw = Swarm(Path(tempfile.mkdtemp()))
    try:
        sw.start("a")
        sw.start("b", join=sw.addr["a"])
        sw.wait_until(lambda: sum(r["role"] in ("coordinator", "member")
                                  for r in sw.status("a")) == 2, 60, "2 members")
        time.sleep(2)
        s0 = sw.steps(["a"])["a"][0]
        t0 = time.monotonic()
        sw.procs["b"].send_signal(signal.SIGINT)
        sw.procs["b"].wait(30)
        exited = time.monotonic() - t0
        while sw.steps(["a"])["a"][0] <= s0 + 1 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        return exited, time.monotonic() - t0
    finally:
        sw.close()


if __name__ == "__main__":
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        exited, applied = trial()
        print(f"leaver exited after {exited:.2f} s; "
              f"survivor's next new round after {applied:.2f} s")
