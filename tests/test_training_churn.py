"""DiLoCo training under churn, as users cause it: real `peerlearn run`
processes on loopback; one is SIGKILLed mid-run, a new peer joins mid-run,
and the killed one is started again from its data dir (its checkpoint).
Training finishes, and at every shared step every peer that held it holds
byte-identical agreed state (outer parameters, outer momentum, step)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from test_training import TINY

SECRET = "churn-test-secret-0123456789abcdef"


def scrape_step(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(r"^peerlearn_step ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


def wait_for(fn, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Peers:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.hello: dict[str, dict] = {}
        self.env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1",
                        OMP_NUM_THREADS="1")

    def start(self, name: str, shard: str, steps: int, join: str | None = None,
              wait_peers: int = 0) -> dict:
        argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "diloco",
                "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                "--data-dir", str(self.tmp / name),
                "--steps", str(steps), "--shard", shard, "--H", "4",
                "--wait-peers", str(wait_peers), "--progress-every", "0", *TINY]
        if join:
            argv += ["--join", join]
        p = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, text=True,
                             stderr=open(self.tmp / f"{name}.log", "a"))
        self.procs[name] = p
        self.hello[name] = json.loads(p.stdout.readline())
        return self.hello[name]

    def report(self, name: str, timeout: float) -> dict:
        out, _ = self.procs[name].communicate(timeout=timeout)
        assert self.procs[name].returncode == 0, (name, (self.tmp / f"{name}.log").read_text())
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_diloco_survives_a_kill_a_joiner_and_a_restart_with_bit_identical_outer_state(tmp_path):
    peers = Peers(tmp_path)
    try:
        # a and b train until told to stop (SIGTERM ends a run with its report).
        a = peers.start("a", "0/4", steps=10**6)
        peers.start("b", "1/4", steps=10**6, join=a["control"])
        peers.start("c", "2/4", steps=10**6, join=a["control"])
        port = a["metrics_port"]
        wait_for(lambda: scrape_step(port) >= 6, 90, "a few outer steps")

        # c dies mid-run (no goodbye, no final checkpoint).
        peers.procs["c"].send_signal(signal.SIGKILL)
        peers.procs["c"].wait()
        s = scrape_step(port)
        wait_for(lambda: scrape_step(port) >= s + 3, 60, "outer steps without c")

        # d joins mid-run; c comes back from its data dir.
        peers.start("d", "3/4", steps=120, join=a["control"])
        peers.start("c", "2/4", steps=120, join=a["control"])

        reports = {n: peers.report(n, 300) for n in ("c", "d")}
        for n in ("a", "b"):
            peers.procs[n].send_signal(signal.SIGTERM)
        reports.update({n: peers.report(n, 60) for n in ("a", "b")})
    finally:
        peers.close()

    # Every peer trained to the end, and the killed one's first run left no report.
    assert reports["c"]["inner_steps"] == reports["d"]["inner_steps"] == 120
    assert min(reports["a"]["inner_steps"], reports["b"]["inner_steps"]) > 120
    # Bit parity: at every shared step, one hash among all peers that held it.
    by_step: dict[str, set[str]] = {}
    for r in reports.values():
        for step, h in r["state_hashes"].items():
            by_step.setdefault(step, set()).add(h)
    assert {s: hs for s, hs in by_step.items() if len(hs) > 1} == {}
    # The latecomers took part: they share steps with the founder and applied outer steps.
    for n in ("c", "d"):
        assert reports[n]["algorithm"]["outer_steps"] >= 3, reports[n]["algorithm"]
        assert len(reports[n]["state_hashes"].keys() & reports["a"]["state_hashes"].keys()) >= 3
