"""TCP hole punching through a relay's rendezvous (transport/punch.py) on
loopback, the rendezvous' wire format (wire/relay.py), and the links of two
dial-back peers punched or relayed (swarm/natlinks.py). Behind emulated
NATs in network namespaces: tests/test_nat_punch.py, tests/test_nat_swarm.py."""

from __future__ import annotations

import hmac
import socket
import threading
import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peerlearn.state.identity import Identity
from peerlearn.swarm.datalinks import CHANNEL_STATE, PeerLinks
from peerlearn.transport import punch as pu
from peerlearn.transport import relay as rl
from peerlearn.wire import relay as wr
from peerlearn.wire.control import DIAL_BACK

KEY = b"k" * 32
A, B = "a" * 32, "b" * 32


@pytest.fixture
def relay():
    r = rl.Relay("127.0.0.1", 0, KEY)
    yield r
    r.close()


def _both(fa, fb):
    out: dict[str, object] = {}

    def run(name, f):
        try:
            out[name] = f()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out[name] = e

    ts = [threading.Thread(target=run, args=(n, f)) for n, f in (("a", fa), ("b", fb))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return out["a"], out["b"]


def _exchange(la, lb) -> None:
    x = torch.arange(50_000, dtype=torch.float32)
    y = torch.empty_like(x)
    t = threading.Thread(target=lambda: lb.recv_into(y, 3, timeout=10))
    t.start()
    la.send(x, 3, timeout=10)
    t.join()
    assert torch.equal(x, y)


def test_two_ends_that_both_ask_get_a_punched_link_with_nothing_relayed(relay):
    (la, pa), (lb, pb) = _both(lambda: pu.connect_punched(relay.address, KEY, A, B, 2, 3, 5.0),
                               lambda: pu.connect_punched(relay.address, KEY, B, A, 2, 3, 5.0))
    try:
        assert pa and pb and la.binding == lb.binding
        _exchange(la, lb)
        _exchange(lb, la)
        # Each connection joins the two ends' own ports: none is the relay's.
        ports = {s.getpeername()[1] for s in la._socks}
        assert len(ports) == 3 and relay.address[1] not in ports
        assert relay.rendezvous == 3 and relay.pairs == 0 and relay.relayed_bytes == 0
        assert relay.spliced == 0  # the relay holds nothing for a rendezvous
    finally:
        la.close()
        lb.close()


def test_when_one_end_does_not_ask_to_punch_the_pair_is_spliced(relay):
    (la, pa), lb = _both(lambda: pu.connect_punched(relay.address, KEY, A, B, 0, 2, 5.0),
                         lambda: rl.connect_relayed(relay.address, KEY, B, A, 0, 2, 5.0))
    try:
        assert pa is False and la.binding == lb.binding
        _exchange(la, lb)
        assert relay.pairs == 2 and relay.rendezvous == 0
    finally:
        la.close()
        lb.close()


def test_a_punch_nobody_answers_fails_within_its_bound():
    # The far end never connects: each connect is refused (a NAT's filter
    # would drop it instead), retried, and the punch fails at its deadline.
    quiet = socket.socket()
    quiet.bind(("127.0.0.1", 0))
    local = socket.socket()
    local.bind(("127.0.0.1", 0))
    mine = local.getsockname()
    local.close()
    started = time.monotonic()
    with pytest.raises(pu.PunchFailed):
        pu.open_punched(mine, quiet.getsockname(), time.monotonic() + 0.5)
    assert 0.4 < time.monotonic() - started < 2.0
    quiet.close()


def test_the_target_is_the_local_endpoint_behind_the_same_address():
    you, other, local = ("203.0.113.5", 40000), ("203.0.113.5", 40001), ("10.0.0.3", 5555)
    assert pu.target_of((you, other, local)) == local
    assert pu.target_of((you, ("198.51.100.7", 40001), local)) == ("198.51.100.7", 40001)


def test_rendezvous_requests_and_answers_are_parsed_strictly():
    key = wr.relay_key(KEY)
    req = wr.request(key, A, B, 5, 1, 2, punch_from=("10.88.0.2", 41000))
    assert wr.parse_request(key, req) == (A, B, 5, 1, 2, True, ("10.88.0.2", 41000))
    assert wr.parse_request(key, wr.request(key, A, B, 5, 1, 2, punch_from=("::1", 9))).local \
        == ("::1", 9)
    # The flags and the endpoint are under the MAC; unknown flags, an
    # endpoint without the flag and an endpoint nobody can reach are refused.
    for off in (104, 110, 121):
        bad = bytearray(req)
        bad[off] ^= 1
        with pytest.raises(ValueError):
            wr.parse_request(key, bytes(bad))
    head = bytearray(req[:-32])
    for flags, endpoint in ((2, head[105:123]), (0, head[105:123]),
                            (1, bytes(16) + b"\x00\x07"), (1, head[105:121] + b"\0\0")):
        h = bytes(head[:104]) + bytes([flags]) + bytes(endpoint)
        with pytest.raises(ValueError):
            wr.parse_request(key, h + hmac.new(key, h, "sha256").digest())
    ans = wr.punch_answer(("198.51.100.1", 1), ("203.0.113.9", 2), ("10.0.0.2", 3))
    assert len(ans) == wr.ANSWER_BYTES
    assert wr.parse_punch_answer(ans) == (("198.51.100.1", 1), ("203.0.113.9", 2),
                                          ("10.0.0.2", 3))
    for bad in (ans[:-1], b"PLRX" + ans[4:], ans[:-2] + b"\0\0",
                ans[:4] + wr.encode_endpoint("224.0.0.1", 5) + ans[22:]):
        with pytest.raises(ValueError):
            wr.parse_punch_answer(bad)
    with pytest.raises(ValueError):
        wr.encode_endpoint("example.org", 80)
    with pytest.raises(ValueError):
        wr.encode_endpoint("10.0.0.1", 0)


@pytest.mark.parametrize("punch", [True, False], ids=["punched", "relayed"])
def test_two_dial_back_peer_links_are_punched_or_relayed(relay, punch):
    """PeerLinks of two dial-back peers (natlinks.py): both ask for their
    link at once; it is punched, or with hole_punch off spliced, greeted
    either way, and counted."""
    ids = [Identity(Ed25519PrivateKey.generate()) for _ in range(2)]
    links = [PeerLinks(i.peer_id, "127.0.0.1", 0, KEY, 2, identity=i, dial_back=True,
                       relay=[relay.address], hole_punch=punch) for i in ids]
    try:
        a, b = _both(
            lambda: links[0].outgoing(ids[1].peer_id, DIAL_BACK, 5.0, CHANNEL_STATE),
            lambda: links[1].incoming(ids[0].peer_id, 5.0, CHANNEL_STATE, address=DIAL_BACK))
        assert a.binding == b.binding and a.traffic == b.traffic == "state"
        _exchange(a, b)
        _exchange(b, a)
        # asked again, the same link
        assert links[0].outgoing(ids[1].peer_id, DIAL_BACK, 5.0, CHANNEL_STATE) is a
        for pl in links:
            assert (pl.punched_links, pl.relayed_links, pl.punch_failures) == \
                ((1, 0, 0) if punch else (0, 1, 0))
        assert relay.relayed_bytes == 0 if punch else relay.relayed_bytes > 0
    finally:
        for pl in links:
            pl.close()


def test_a_failed_punch_is_counted_relayed_and_not_tried_again_soon(relay, monkeypatch):
    # Every punch fails as across a symmetric NAT (the far port filtered).
    monkeypatch.setattr(pu, "target_of", lambda answer: ("127.0.0.1", 1))
    monkeypatch.setattr(pu, "PUNCH_S", 0.5)
    ids = [Identity(Ed25519PrivateKey.generate()) for _ in range(2)]
    links = [PeerLinks(i.peer_id, "127.0.0.1", 0, KEY, 2, identity=i, dial_back=True,
                       relay=[relay.address]) for i in ids]
    try:
        for channel in (0, 1):  # the second link goes straight to the relay
            a, b = _both(lambda c=channel: links[0].outgoing(ids[1].peer_id, DIAL_BACK, 8.0, c),
                         lambda c=channel: links[1].outgoing(ids[0].peer_id, DIAL_BACK, 8.0, c))
            assert a.binding == b.binding, (a, b)
            _exchange(a, b)
        for pl in links:
            assert (pl.punched_links, pl.relayed_links, pl.punch_failures) == (0, 2, 1)
        assert relay.rendezvous == 2 and relay.pairs == 4
    finally:
        for pl in links:
            pl.close()
