"""Restarts, as a user does them: real peer processes on loopback stopped or
killed and started again from their data dirs (identity and checkpoint).

Every test ends on the history invariant, read from every peer's log: a step,
once applied by any peer, has exactly one state hash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_swarm import SECRET, Swarm, applied_hashes, free_port

from peerlearn.state import checkpoint


def steps_of(sw: Swarm, names) -> int:
    return min(st for st, _ in sw.steps(names).values())


def no_rewrites(sw: Swarm) -> None:
    assert {s: h for s, h in applied_hashes(sw.tmp).items() if len(h) > 1} == {}


@pytest.mark.parametrize("founder_is_smaller", [True, False])
def test_two_peer_swarm_resumes_after_the_smaller_id_restarts(tmp_path, founder_is_smaller):
    sw = Swarm(tmp_path)
    try:
        ids = {"a": sw.start("a")}
        ids["b"] = sw.start("b", join=sw.addr["a"])
        tries = 0
        while (ids["a"] < ids["b"]) != founder_is_smaller:  # identities are random
            sw.close()
            tries += 1
            sw = Swarm(tmp_path / f"try{tries}")
            sw.tmp.mkdir()
            ids = {"a": sw.start("a")}
            ids["b"] = sw.start("b", join=sw.addr["a"])
        sw.wait_until(lambda: steps_of(sw, "ab") >= 5, 40, "a few steps")
        small = min(ids, key=ids.get)
        other = "b" if small == "a" else "a"
        sw.procs[small].terminate()  # SIGTERM: leaves, writes its checkpoint
        sw.procs[small].wait(timeout=10)
        # The same command line again: the founder founds (from its checkpoint).
        again = sw.start(small, join=None if small == "a" else sw.addr[other])
        assert again == ids[small]  # coordinator again, its counters back at zero
        s0 = steps_of(sw, [other])
        sw.wait_until(lambda: steps_of(sw, "ab") >= s0 + 5, 30,
                      "rounds after the coordinator restarted")
        no_rewrites(sw)
    finally:
        sw.close()


def test_majority_restarted_from_older_checkpoints_never_rewrites_a_step(tmp_path):
    """5 peers; 3 (the coordinator among them) are SIGKILLed, so the other 2
    hold their step with no quorum; the 3 restart from checkpoints older than
    that step. They must sync to the survivors' state, not redo its steps."""
    sw = Swarm(tmp_path)
    try:
        ids = {"a": sw.start("a")}
        for n in "bcde":
            ids[n] = sw.start(n, join=sw.addr["a"])
        sw.wait_until(lambda: sum(r["role"] in ("coordinator", "member")
                                  for r in sw.status("a")) == 5, 60, "5 members")
        order = sorted(ids, key=ids.get)
        victims, survivors = order[:3], order[3:]  # the smallest id coordinates
        for v in victims:
            sw.wait_until(lambda v=v: (sw.tmp / v / "state.ckpt").exists(), 60, "checkpoints")
        sw.wait_until(lambda: steps_of(sw, survivors) % 10 >= 3, 30, "a step past a checkpoint")
        for v in victims:
            sw.procs[v].kill()
        time.sleep(4 * 1.5)  # the survivors see them dead; no quorum: no step moves
        held = steps_of(sw, survivors)
        saved = {v: checkpoint.load(sw.tmp / v / "state.ckpt").step for v in victims}
        assert max(saved.values()) < held, (saved, held)
        for v in victims:
            assert sw.start(v, join=sw.addr[survivors[0]]) == ids[v]
        sw.wait_until(lambda: steps_of(sw, list(ids)) >= held + 5, 60,
                      "all five past the survivors' step")
        no_rewrites(sw)
        for v in victims:
            log = (sw.tmp / f"{v}.log").read_text()
            assert "synced to step" in log.split("joined a swarm")[-1], v
    finally:
        sw.close()


def _run_joining(tmp_path, *extra) -> subprocess.Popen:
    dead = f"127.0.0.1:{free_port()}"  # nobody listens there
    env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
         "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "j"), "--join", dead, "--metrics", "off", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_join_to_a_dead_address_gives_up_with_one_clear_line(tmp_path):
    t0 = time.monotonic()
    p = _run_joining(tmp_path, "--join-timeout", "3")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert time.monotonic() - t0 < 20
    assert "Traceback" not in err and "never retrieved" not in err
    assert err.strip().splitlines()[-1].startswith("peerlearn: no swarm member answered")


def test_a_signal_stops_a_peer_that_is_still_joining(tmp_path):
    p = _run_joining(tmp_path, "--join-timeout", "0")  # would try forever
    time.sleep(3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=15)
    assert time.monotonic() - t0 < 5
    assert p.returncode == 0, err
    assert "Traceback" not in err
