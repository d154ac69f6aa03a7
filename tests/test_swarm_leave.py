"""Peers that stop with Ctrl-C leave the view, so the rest go on; peers that
are killed keep their place, and a survivor without a majority says so.

Real processes on loopback (the README's two-machine swarm, on one machine):
a 3-peer swarm loses two peers to Ctrl-C one after the other and the last
one keeps applying rounds alone; then two joiners are killed, and the
survivor names them in one ERROR line and in `status`.
"""

from __future__ import annotations

import signal
import time

from test_swarm import Swarm, parity

from peerlearn.cli.admin_cmds import quorum_line



def step_of(sw: Swarm, name: str) -> int:
    return sw.steps([name])[name][0]


def progress_within(sw: Swarm, name: str, rounds: int, timeout: float) -> float:
    """Seconds until `name` applied `rounds` more rounds (fails after timeout)."""
    t0, s0 = time.monotonic(), step_of(sw, name)
    sw.wait_until(lambda: step_of(sw, name) >= s0 + rounds, timeout,
                  f"{name} applying {rounds} rounds")
    return time.monotonic() - t0


def ctrl_c(sw: Swarm, name: str) -> None:
    p = sw.procs[name]
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 0


def test_leaving_peers_shrink_the_quorum_and_killed_ones_are_named(tmp_path):
    sw = Swarm(tmp_path)
    try:
        sw.start("a")
        ids = {"a": sw.status("a")[0]["id"]}
        for n in ("b", "c"):
            ids[n] = sw.start(n, join=sw.addr["a"])

        def members(names):
            rows = {r["id"]: r["role"] for r in sw.status("a")}
            return all(rows.get(ids[n]) in ("coordinator", "member") for n in names)
        sw.wait_until(lambda: members("abc"), 60, "3 members")
        parity(sw, ["a", "b", "c"])

        # Ctrl-C one peer, then another: each time the rest apply rounds
        # within 10 s of its exit (before, 1 of 2 could never be a majority).
        ctrl_c(sw, "b")
        assert progress_within(sw, "a", 3, 10) < 10
        ctrl_c(sw, "c")
        assert progress_within(sw, "a", 3, 10) < 10
        roles = {r["id"]: r["role"] for r in sw.status("a")}
        assert roles[ids["a"]] == "coordinator"
        assert all(roles.get(ids[n], "dead") == "dead" for n in "bc")
        assert "majority lost" not in (tmp_path / "a.log").read_text()
        assert quorum_line(sw.status("a")) is None

        # Two joiners, then both killed: they may come back, so they keep
        # their places, and 1 of 3 is no majority. The survivor says why.
        for n in ("d", "e"):
            ids[n] = sw.start(n, join=sw.addr["a"])
        sw.wait_until(lambda: members("ade"), 60, "d and e members")
        for n in "de":
            sw.procs[n].kill()
            sw.procs[n].wait()
        sw.wait_until(lambda: "majority lost" in (tmp_path / "a.log").read_text(), 20,
                      "the ERROR line")
        line = next(ln for ln in (tmp_path / "a.log").read_text().splitlines()
                    if "majority lost" in ln)
        assert "ERROR" in line and "2 of the view's 3 voting members are unreachable" in line
        assert sw.addr["d"] in line and sw.addr["e"] in line and "applied.json" in line
        rows = sw.status("a")
        roles = {r["id"]: r["role"] for r in rows}
        assert roles[ids["d"]] == roles[ids["e"]] == "lost"
        verdict = quorum_line(rows)  # what `peerlearn status` prints below the rows
        assert verdict.startswith("NO MAJORITY: 2 of the view's 3 members are unreachable")
        assert sw.addr["d"] in verdict and sw.addr["e"] in verdict
        s = step_of(sw, "a")
        time.sleep(2)
        assert step_of(sw, "a") <= s + 1  # the round in flight at most

        # They come back from their data dirs: rounds go on.
        for n in ("d", "e"):
            sw.start(n, join=sw.addr["a"])
        assert progress_within(sw, "a", 3, 30) < 30
        parity(sw, ["a", "d", "e"])
    finally:
        sw.close()
