"""The relay (transport/relay.py) on loopback: two peers that cannot dial
each other get one link through it, authenticated end to end; requests
without the key, and requests whose other half never comes, are refused;
what a client can make the relay hold is bounded."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from peerlearn.transport import relay as rl

KEY = b"k" * 32
A, B = "a" * 32, "b" * 32


@pytest.fixture
def relay():
    r = rl.Relay("127.0.0.1", 0, KEY)
    yield r
    r.close()


def _pair(relay, channel=0, n=2, key=KEY, timeout=5.0):
    out: dict[str, object] = {}

    def side(me, peer):
        try:
            out[me] = rl.connect_relayed(relay.address, key, me, peer, channel, n, timeout)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out[me] = e

    ts = [threading.Thread(target=side, args=(A, B)), threading.Thread(target=side, args=(B, A))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return out[A], out[B]


def test_two_peers_get_one_link_both_ways_through_the_relay(relay):
    la, lb = _pair(relay, n=3)
    try:
        assert la.binding == lb.binding  # one handshake, end to end
        x = torch.arange(100_000, dtype=torch.float32)
        y, z = torch.empty_like(x), torch.empty_like(x)
        t = threading.Thread(target=lambda: lb.recv_into(y, 7, timeout=10))
        t.start()
        la.send(x, 7, timeout=10)
        t.join()
        assert torch.equal(x, y)
        t = threading.Thread(target=lambda: la.recv_into(z, 8, timeout=10))
        t.start()
        lb.send(x * 2, 8, timeout=10)
        t.join()
        assert torch.equal(z, x * 2)
        # counted once the relay's sendall returned, which may be after the
        # receiver has the bytes
        deadline = time.monotonic() + 5
        while relay.relayed_bytes < 2 * x.numel() * 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.relayed_bytes >= 2 * x.numel() * 4
        assert relay.spliced == 3
    finally:
        la.close()
        lb.close()
    deadline = time.monotonic() + 5
    while relay.spliced and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.spliced == 0  # closed links free their splices


def test_a_request_without_the_key_or_without_its_other_half_is_refused(relay, monkeypatch):
    la, lb = _pair(relay, key=b"x" * 32, timeout=2.0)
    assert isinstance(la, rl.RelayRefused) and isinstance(lb, rl.RelayRefused), (la, lb)
    deadline = time.monotonic() + 5  # the relay may still be reading the last of the 4
    while relay.refused < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.refused == 4
    monkeypatch.setattr(rl, "WAIT_S", 0.3)
    with pytest.raises((rl.RelayRefused, TimeoutError)):
        rl.connect_relayed(relay.address, KEY, A, B, 0, 1, 3.0)  # B never asks


def test_waiting_requests_are_bounded_per_peer(relay, monkeypatch):
    monkeypatch.setattr(rl, "MAX_WAITING_PER_PEER", 4)
    key = rl.relay_key(KEY)
    socks = []
    try:
        for i in range(10):
            s = socket.create_connection(relay.address)
            s.sendall(rl.request(key, A, f"{i:032d}", 0, 0, 1))
            socks.append(s)
        deadline = time.monotonic() + 5
        while relay.refused < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.refused == 6
    finally:
        for s in socks:
            s.close()


def test_requests_are_parsed_strictly():
    key = rl.relay_key(KEY)
    good = rl.request(key, A, B, 5, 1, 2)
    assert rl.parse_request(key, good) == (A, B, 5, 1, 2, False, None)
    with pytest.raises(ValueError):
        rl.parse_request(key, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError):
        rl.parse_request(key, rl.request(key, A, B, 5, 1, 2, now=time.time() - 1000))
    with pytest.raises(ValueError):
        rl.parse_request(key, rl.request(key, A, A, 5, 0, 1))
    with pytest.raises(ValueError):
        rl.parse_request(key, rl.request(key, A, B, 5, 2, 2))
