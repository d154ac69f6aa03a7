"""A peer nobody can dial (behind NAT, no forwarded port) takes part in a
swarm: `--advertise dial-back` (issue 18). Real peer processes on loopback:
the dial-back peer's ports are bound but never told to anyone, so every
connection it has it opened itself; it syncs the swarm's state, takes part in
rounds and holds the same state as the others. (The same in network
namespaces behind an emulated NAT: tests/test_netsim_nat.py for the NAT.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest


SECRET = "dial-back-test-secret-0123456789"


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in re.findall(r"^(peerlearn_\w+) ([0-9.e+-]+)$", text, re.M)}


class Peer:
    def __init__(self, tmp_path, name: str, *extra: str):
        env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1")
        self.log = tmp_path / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
             "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--dead-after", "2",
             "--data-dir", str(tmp_path / name), "--numel", "20000", "--compute-s", "0.2",
             "--log-level", "debug", *extra],
            env=env, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True)
        line = self.proc.stdout.readline()
        assert line, self.log.read_text()[-3000:]
        self.hello = json.loads(line)
        self.id = self.hello["peer"]

    def metrics(self) -> dict[str, float]:
        return scrape(self.hello["metrics_port"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")

APPLIED = re.compile(r"step (\d+) applied \(round \d+\) state ([0-9a-f]{16})")


def applied(peer) -> dict[int, str]:
    """step -> the state hash the peer logged when it applied that step."""
    return {int(m[1]): m[2] for m in APPLIED.finditer(peer.log.read_text(errors="replace"))}


def assert_parity(peers, min_common: int = 3, timeout: float = 30.0) -> None:
    """Every step that more than one of the peers applied has one hash at all
    of them, and at least min_common steps were applied by every one (read
    from their own logs: a status snapshot shows peers mid-round at
    different steps, and rounds here come faster than heartbeats)."""
    def common():
        logs = [applied(p) for p in peers]
        return sorted(set.intersection(*(set(x) for x in logs)))
    wait_for(lambda: len(common()) >= min_common, timeout,
             f"{min_common} steps applied by all of {len(peers)} peers")
    logs = [applied(p) for p in peers]
    for step in set().union(*logs):
        hashes = {x[step] for x in logs if step in x}
        assert len(hashes) == 1, (step, hashes)



def test_a_peer_nobody_can_dial_syncs_takes_part_and_keeps_parity(tmp_path):
    founder = Peer(tmp_path, "a")
    peers = [founder]
    try:
        peers.append(Peer(tmp_path, "b", "--join", founder.hello["control"]))
        wait_for(lambda: founder.metrics().get("peerlearn_step", 0) >= 5, 60, "rounds of two")
        nat = Peer(tmp_path, "c", "--join", founder.hello["control"], "--advertise", "dial-back")
        peers.append(nat)
        assert nat.hello["control"] == "dial-back"

        # It fetched the state (pulled over links it opened) and then applied
        # rounds it took part in.
        wait_for(lambda: nat.metrics().get("peerlearn_rounds_applied_total", 0) >= 5, 90,
                 "the dial-back peer to apply rounds")
        m = nat.metrics()
        assert m["peerlearn_state_syncs_total"] >= 1
        # Nobody opened a connection to it: every link it has, it dialled.
        assert m["peerlearn_control_connections_incoming"] == 0
        assert m["peerlearn_data_links_incoming"] == 0

        # Parity: every step applied by more than one has one hash at all of them.
        assert_parity(peers)
        log = (tmp_path / "c.log").read_text()
        assert "applied (round" in log
    finally:
        for p in reversed(peers):
            p.stop()


def test_two_peers_one_of_them_undialable_run_rounds_over_one_link(tmp_path):
    """A round of two is a ring: the dial-back peer's link to the founder
    carries both directions."""
    founder = Peer(tmp_path, "a")
    peers = [founder]
    try:
        nat = Peer(tmp_path, "c", "--join", founder.hello["control"], "--advertise", "dial-back")
        peers.append(nat)
        wait_for(lambda: nat.metrics().get("peerlearn_rounds_applied_total", 0) >= 5, 90,
                 "the dial-back peer to apply rounds")
        assert nat.metrics()["peerlearn_data_links_incoming"] == 0

        assert_parity(peers)
    finally:
        for p in reversed(peers):
            p.stop()


@pytest.mark.parametrize("punch", [False, True], ids=["relayed", "punched"])
def test_two_dial_back_peers_share_rounds_through_a_relay(tmp_path, punch):
    """Neither of two dial-back peers can reach the other: their control
    messages go through a member both reach (signed end to end), and their
    data link through the founder's relay (--relay / --relay-via), or, by
    default, punched with the relay only introducing them (with no NAT in
    between, the punch is a connection on loopback); all three take part in
    rounds and keep parity, and the relayed bytes and punched links are
    counted."""
    founder = Peer(tmp_path, "a", "--relay", "0")
    peers = [founder]
    try:
        via = f"127.0.0.1:{founder.hello['relay']}"
        for name in ("b", "c"):
            peers.append(Peer(tmp_path, name, "--join", founder.hello["control"],
                              "--advertise", "dial-back", "--relay-via", via,
                              *(() if punch else ("--no-hole-punch",))))

        def all_three_apply():
            return all(p.metrics().get("peerlearn_rounds_applied_total", 0) >= 5
                       for p in peers[1:])
        wait_for(all_three_apply, 120, "both dial-back peers to apply rounds")
        m = founder.metrics()
        assert m["peerlearn_control_forwarded_total"] > 0
        ours = [p.metrics() for p in peers[1:]]
        if punch:
            assert m["peerlearn_relayed_bytes_total"] == 0
            assert all(o["peerlearn_punched_links_total"] >= 1 for o in ours), ours
            assert all(o["peerlearn_relayed_links_total"] == 0 for o in ours), ours
        else:
            assert m["peerlearn_relayed_bytes_total"] > 0
            assert all(o["peerlearn_relayed_links_total"] >= 1 for o in ours), ours
            assert all(o["peerlearn_punched_links_total"] == 0 for o in ours), ours

        assert_parity(peers)
        # Rounds of all three ran: each dial-back peer took part in rounds
        # with the other (the direct all-reduce of 3 links every pair).
        for name in ("b", "c"):
            assert "applied (round" in (tmp_path / f"{name}.log").read_text()
    finally:
        for p in reversed(peers):
            p.stop()
