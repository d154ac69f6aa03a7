"""SWIM between real peers (swarm/swim_driver.py): its messages ride the
control plane beside the round protocol's (wire/messages.py), members find
each other, a silent peer is confirmed dead and a closed one left, and a
peer that runs no SWIM drops its messages and counts them."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch

from peerlearn.cli.metrics import snapshot
from peerlearn.state.shared import SharedState
from peerlearn.swarm.api import Peer
from peerlearn.swarm.peer import PeerConfig
from peerlearn.swarm.rounds import Timeouts
from peerlearn.wire import control as m
from peerlearn.wire import messages
from peerlearn.wire import swim as w
from tests.test_api import run_all

SECRET = b"swim-daemon-test-secret-01234567"
FAST = Timeouts(heartbeat_every=0.1, dead_after=2.0, gather=2.0, ack=2.0)
ID = "ab" * 16


def test_the_plane_tells_swim_arrays_from_control_maps():
    up = w.Update(w.ALIVE, ID, 3, "127.0.0.1:7400")
    for msg in (w.Ping(1, (up,)), w.Ack(2, ()), w.PingReq(3, ID, (up,)), w.Nack(4),
                w.Join(5, "127.0.0.1:7401"), w.Members(0, 1, (up,)),
                m.Leave(), m.StatusRequest("127.0.0.1:9")):
        assert messages.decode(messages.encode(msg)) == msg
    for bad in (b"", msgpack.packb([9, 1, []]), msgpack.packb([0, 1]), msgpack.packb({"t": 0}),
                msgpack.packb("ping"), b"\xdc\x00"):
        with pytest.raises(messages.MessageError):
            messages.decode(bad)


@pytest.fixture
def swarm(tmp_path):
    started: list[Peer] = []

    def make(n: int, swim=lambda i: True) -> list[Peer]:
        first = Peer(PeerConfig(tmp_path / "p0", SECRET, timeouts=FAST, swim=swim(0)),
                     initial).start()
        started.append(first)
        for i in range(1, n):
            started.append(Peer(PeerConfig(tmp_path / f"p{i}", SECRET, timeouts=FAST,
                                           swim=swim(i), join=first.control_address)
                                ).start(timeout=20))
        return started

    yield make
    for p in started:
        p.close()


def initial() -> SharedState:
    state = SharedState(0)
    state.register("w", torch.zeros(4))
    return state


def wait_until(what, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    return what()


def swim_view(p: Peer) -> dict[str, str]:
    return p._on_loop(lambda: {i: p.daemon.swim.member.state_of(i)
                               for i in p.daemon.swim.member.table})


def test_members_find_each_other_and_a_silent_one_is_confirmed_dead(swarm):
    peers = swarm(4)
    ids = {p.id for p in peers}
    assert wait_until(lambda: all(swim_view(p) == {i: "alive" for i in ids - {p.id}}
                                  for p in peers), 30), [swim_view(p) for p in peers]
    shown = peers[0]._on_loop(lambda: snapshot(peers[0].daemon))  # what /metrics serves
    assert shown["swim_members"] == {"alive": 3, "suspect": 0, "dead": 0, "left": 0}
    assert shown["swim_messages"]["sent"] > 0 and shown["swim_messages"]["received"] > 0
    # O(1) messages a period: each member's own Pings at most one a period
    # (its probe), whatever the swarm; PingReqs only after a missed Ack.
    window_start = {p.id: p._on_loop(lambda p=p: dict(p.daemon.swim.sent)) for p in peers}
    time.sleep(3.0)
    for p in peers:
        sent = p._on_loop(lambda p=p: dict(p.daemon.swim.sent))
        pings = sent.get("Ping", 0) - window_start[p.id].get("Ping", 0)
        assert pings <= 3 + 1, sent
    # Silence one (its sends dropped, as a crash or a cut cable): the others'
    # SWIM confirms it dead; nobody else changes.
    quiet = peers[3]
    quiet._on_loop(lambda: setattr(quiet.daemon.plane, "send", lambda *a, **k: None))
    others = peers[:3]
    assert wait_until(lambda: all(swim_view(p).get(quiet.id) == "dead" for p in others), 45), \
        [swim_view(p) for p in others]
    for p in others:
        view = swim_view(p)
        # Under load a live member may be suspect for a moment (a late Ack);
        # only the silent one is confirmed dead.
        assert all(view[i] in ("alive", "suspect") for i in ids - {p.id, quiet.id}), view


def test_a_closed_peer_is_left_at_once_and_comes_back_and_a_peer_without_swim_drops_its_messages(
        swarm, tmp_path):
    peers = swarm(3, swim=lambda i: i != 2)  # p2 runs no SWIM
    with_swim = peers[:2]
    assert wait_until(lambda: all(swim_view(p).get(q.id) == "alive"
                                  for p in with_swim for q in with_swim if q is not p), 30)
    # p2 never joined SWIM, so nobody probes it; a Ping sent to it anyway is
    # dropped and counted (not handed to the round logic, whose Join it
    # would otherwise look like), and its rounds go on.
    plain = peers[2]
    peers[0]._on_loop(lambda: peers[0].daemon.plane.send(
        plain.daemon.info.control, w.Join(0, peers[0].daemon.info.control), to=plain.id))
    assert wait_until(lambda: plain._on_loop(lambda: plain.daemon.swim_dropped) == 1, 10)
    assert plain._on_loop(lambda: plain.daemon.handler_errors + plain.daemon.core.rejected) == 0
    run_all(peers, lambda i, p: p.all_reduce({"g": torch.full((4,), float(i))}, timeout=20))
    closing = peers[1]
    gone = closing.id
    closing.close()
    assert wait_until(lambda: swim_view(peers[0]).get(gone) == "left", 10), swim_view(peers[0])
    # Restarted from its data directory (the same id): its new incarnation
    # outranks the LEFT the others keep, and it is alive to them again.
    back = Peer(PeerConfig(tmp_path / "p1", SECRET, timeouts=FAST, swim=True,
                           join=peers[0].control_address)).start(timeout=20)
    peers.append(back)  # closed by the fixture
    assert back.id == gone
    assert wait_until(lambda: swim_view(peers[0]).get(gone) == "alive", 20), swim_view(peers[0])
