"""Peers behind NAT train with the rest (issue 18), in network namespaces
behind the emulator's NAT gateways (peerlearn.netsim, nat_sites).

Relays: a public founder and a public peer, both relaying; two peers behind
one NAT and one behind another, each `--advertise dial-back --relay-via`
both relays and `--no-hole-punch`. Nobody can open a connection to a NATed
peer, so every link it has it opened itself or got through a relay. All
five apply rounds with the same state at every step; when the founder (the
first relay) is killed, the others go on through the second.

Hole punching: a public founder relaying, and two dial-back peers behind
two NATs. Endpoint-independent mapping on both: their link is punched
(the relay only introduces them) and rounds apply with nothing relayed. A
symmetric NAT on one side: the punch fails, the relay carries the link,
rounds apply all the same."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from peerlearn.netsim import NatOptions, WanEmulator, netns_available
from peerlearn.netsim.nat import SYMMETRIC

ok, why = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]

SECRET = "nat-swarm-test-secret-0123456789"


def applied(log) -> dict[int, str]:
    return {int(a): b for a, b in re.findall(
        r"step (\d+) applied \(round \d+\) state ([0-9a-f]{16})", log.read_text())}


def stop(procs) -> None:
    """Terminate every peer process still running; kill one that hangs."""
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


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
        for i in (1, 2, 3):  # this test is the relays': hole punching is the next one's
            start(i, "--advertise", "dial-back", "--relay-via", relays, "--no-hole-punch")

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
        stop(procs)


def scrape(wan: WanEmulator, host: int, port: int) -> dict[str, float]:
    """The peer's metrics, fetched inside its namespace."""
    code = f"import urllib.request; print(urllib.request.urlopen(" \
           f"{f'http://127.0.0.1:{port}/metrics'!r}, timeout=10).read().decode())"
    p = wan.popen(host, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    text, _ = p.communicate(timeout=30)
    return {k: float(v) for k, v in re.findall(r"^(peerlearn_\w+) ([0-9.e+-]+)$", text, re.M)}


def _punching_swarm(tmp_path, nat_options) -> dict:
    """A public founder relaying, dial-back peers behind sites a and b; runs
    until all three applied 15 rounds; returns each one's metrics and log."""
    with WanEmulator(n_hosts=3, rtt_ms=20, rate_mbit=0, nat_sites={"a": [1], "b": [2]},
                     nat_options=nat_options) as wan:
        env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1",
                   PYTHONFAULTHANDLER="1")
        logs = [tmp_path / f"p{i}.log" for i in range(3)]
        procs, hello = {}, {}
        relay = f"{wan.hosts[0].addr}:7500"
        try:
            for i in range(3):
                argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                        "--listen", f"{wan.hosts[i].addr}:7400", "--data-dir",
                        str(tmp_path / f"d{i}"), "--numel", "20000", "--compute-s", "0.2",
                        "--dead-after", "2", "--log-level", "debug",
                        "--metrics", "127.0.0.1:0"]
                argv += ["--relay", "7500"] if i == 0 else \
                    ["--join", f"{wan.hosts[0].addr}:7400", "--advertise", "dial-back",
                     "--relay-via", relay]
                procs[i] = wan.popen(i, argv, env=env, stdout=subprocess.PIPE, text=True,
                                     stderr=open(logs[i], "w"))  # noqa: SIM115
                hello[i] = json.loads(procs[i].stdout.readline())
            wait(lambda: all(len(applied(logs[i])) >= 15 for i in range(3)), 150,
                 "all three to apply rounds")
            metrics = {i: scrape(wan, i, hello[i]["metrics_port"]) for i in range(3)}
            stats = wan.stats()
        finally:
            stop(procs)
    steps: dict[int, set[str]] = {}
    for log in logs:
        for step, h in applied(log).items():
            steps.setdefault(step, set()).add(h)
    assert all(len(hs) == 1 for hs in steps.values()), \
        {s: hs for s, hs in steps.items() if len(hs) > 1}
    return {"metrics": metrics, "logs": [log.read_text() for log in logs], "stats": stats}


def test_two_peers_behind_two_nats_punch_their_link_and_relay_nothing(tmp_path):
    run = _punching_swarm(tmp_path, NatOptions())
    m, logs = run["metrics"], run["logs"]
    for i in (1, 2):  # both dial-back peers: every link between them punched
        assert m[i]["peerlearn_punched_links_total"] >= 1, logs[i][-3000:]
        assert m[i]["peerlearn_punch_failures_total"] == 0
        assert m[i]["peerlearn_relayed_links_total"] == 0
        assert "punched a link to" in logs[i]
    # The founder's relay introduced them and carried no byte: every round
    # among the three went over the punched link.
    assert m[0]["peerlearn_relayed_bytes_total"] == 0
    assert m[0]["peerlearn_relay_rendezvous_total"] >= 1
    assert m[1]["peerlearn_rounds_applied_total"] >= 10


def test_a_symmetric_nat_makes_the_punch_fail_and_the_relay_carry_the_link(tmp_path):
    run = _punching_swarm(tmp_path, {"a": NatOptions(mapping=SYMMETRIC), "b": NatOptions()})
    m, logs = run["metrics"], run["logs"]
    for i in (1, 2):
        assert m[i]["peerlearn_punch_failures_total"] >= 1, logs[i][-3000:]
        assert m[i]["peerlearn_punched_links_total"] == 0
        assert m[i]["peerlearn_relayed_links_total"] >= 1
        assert "could not punch a link to" in logs[i]
    assert m[0]["peerlearn_relayed_bytes_total"] > 0
    assert run["stats"]["nat"]["a"]["dropped_filtered"] + \
        run["stats"]["nat"]["b"]["dropped_filtered"] > 0
