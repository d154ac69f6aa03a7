"""TCP hole punching behind the WAN emulator's NAT gateways (issue 18), in
network namespaces: a relay on a public host, two ends behind NATs, each
asking the relay for a rendezvous on each connection of a link and
punching (tests/punch_probe.py; transport/punch.py). Endpoint-independent
mapping on both sides: every connection is punched, nothing is relayed.
A symmetric side: the punch fails within its bound and the two fall back
to a splice through the relay. Two ends behind one NAT (no hairpinning):
punched over their LAN."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peerlearn.netsim import NatOptions, WanEmulator, netns_available
from peerlearn.netsim.nat import EIM, SYMMETRIC
from peerlearn.transport.punch import PUNCH_S

ok, why = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "punch_probe.py")
A, B = "a" * 32, "b" * 32


def _punch(wan: WanEmulator, ends: tuple[int, int]) -> tuple[dict, dict, dict]:
    relay = wan.popen(0, [sys.executable, PROBE, "relay", "7500"], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout.readline().strip() == "ready"
        via = f"{wan.hosts[0].addr}:7500"
        procs = [wan.popen(h, [sys.executable, PROBE, "peer", via, me, peer], text=True,
                           stdout=subprocess.PIPE)
                 for h, me, peer in ((ends[0], A, B), (ends[1], B, A))]
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
            outs.append(json.loads(out.strip().splitlines()[-1]))
        out, _ = relay.communicate("", timeout=30)
        return outs[0], outs[1], json.loads(out.strip().splitlines()[-1])
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()


@pytest.mark.parametrize("modes", [(EIM, EIM)], ids=["eim-eim"])
def test_a_link_is_punched_between_endpoint_independent_nats(modes):
    opts = {"a": NatOptions(mapping=modes[0]), "b": NatOptions(mapping=modes[1])}
    with WanEmulator(n_hosts=3, rtt_ms=50, rate_mbit=100, nat_sites={"a": [1], "b": [2]},
                     nat_options=opts) as wan:
        a, b, relay = _punch(wan, (1, 2))
        st = wan.stats()
    assert a["punched"] and b["punched"] and a["ok"] and b["ok"], (a, b)
    # Each of the 4 connections joins the two NATs' public addresses: no
    # byte went through the relay, which only introduced them.
    assert {tuple(r)[0] for r in a["remote"]} == {wan.sites["b"].addr}
    assert {tuple(r)[0] for r in b["remote"]} == {wan.sites["a"].addr}
    assert relay == {"pairs": 0, "rendezvous": 4, "relayed_bytes": 0, "refused": 0}
    # The rendezvous (2 RTT to the relay, one request and answer), then the
    # SYNs cross in one one-way delay, then the link handshake.
    assert a["seconds"] < PUNCH_S and b["seconds"] < PUNCH_S
    # One mapping per connection on each side: the punch reused the port
    # the relay saw (endpoint-independent), and its SYNs were let in.
    assert st["nat"]["a"]["mappings_created"] == 4 and st["nat"]["b"]["mappings_created"] == 4


@pytest.mark.parametrize("modes", [(SYMMETRIC, EIM), (SYMMETRIC, SYMMETRIC)],
                         ids=["symmetric-eim", "symmetric-symmetric"])
def test_a_symmetric_nat_makes_the_punch_fail_and_the_relay_carry_the_link(modes):
    opts = {"a": NatOptions(mapping=modes[0]), "b": NatOptions(mapping=modes[1])}
    with WanEmulator(n_hosts=3, rtt_ms=50, rate_mbit=100, nat_sites={"a": [1], "b": [2]},
                     nat_options=opts) as wan:
        a, b, relay = _punch(wan, (1, 2))
        st = wan.stats()
    assert not a["punched"] and not b["punched"] and a["ok"] and b["ok"], (a, b)
    assert a["failed"] and b["failed"]
    assert {tuple(r)[0] for r in a["remote"]} == {wan.hosts[0].addr}  # the relay
    assert relay["rendezvous"] == 4 and relay["pairs"] == 4
    assert relay["relayed_bytes"] >= 2 * 250_000 * 4
    # Given up at the bound, then spliced at once.
    assert PUNCH_S <= a["seconds"] < PUNCH_S + 3 and PUNCH_S <= b["seconds"] < PUNCH_S + 3
    assert st["nat"]["a"]["dropped_filtered"] + st["nat"]["a"]["dropped_no_mapping"] > 0


def test_two_ends_behind_one_nat_punch_over_their_lan():
    with WanEmulator(n_hosts=3, rtt_ms=50, rate_mbit=100, nat_sites={"a": [1, 2]}) as wan:
        a, b, relay = _punch(wan, (1, 2))
    assert a["punched"] and b["punched"] and a["ok"] and b["ok"], (a, b)
    assert {tuple(r)[0] for r in a["remote"]} == {wan.hosts[2].addr}  # its private address
    assert relay["pairs"] == 0 and relay["relayed_bytes"] == 0
