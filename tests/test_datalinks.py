"""PeerLinks over loopback: greetings bound to identities, links replaced under
a receive."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peerlearn.state.identity import Identity
from peerlearn.swarm.datalinks import GREETING_OP, PeerLinks, send_greeting
from peerlearn.transport.stream import LinkListener, connect_link

KEY = b"data-plane-key-0123456789abcdef!"


def identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def acceptor():
    me = identity()
    links = PeerLinks(me.peer_id, "127.0.0.1", 0, KEY, 2, identity=me)
    yield links
    links.close()


def address(links: PeerLinks) -> str:
    return f"127.0.0.1:{links.port}"


def test_a_signed_greeting_files_the_link_under_its_peer_id(acceptor):
    x = identity()
    sender = PeerLinks(x.peer_id, "127.0.0.1", 0, KEY, 2, identity=x)
    try:
        link = sender.outgoing(acceptor.my_id, address(acceptor), channel=5)
        got = torch.zeros(1000)
        t = threading.Thread(target=acceptor.recv_into,
                             args=(x.peer_id, got, 42), kwargs=dict(channel=5, timeout=5))
        t.start()
        link.send(torch.arange(1000, dtype=torch.float32), 42, timeout=5)
        t.join(5)
        assert torch.equal(got, torch.arange(1000, dtype=torch.float32))
        assert acceptor.bad_greetings == 0
    finally:
        sender.close()


def _raw_link(acceptor):
    return connect_link("127.0.0.1", acceptor.port, KEY, 2, timeout=5)


def test_a_member_cannot_claim_another_peers_id(acceptor):
    victim, member = identity(), identity()
    link = _raw_link(acceptor)
    try:
        # The member holds the data key and signs with its own key, but names the victim.
        head = victim.peer_id.encode().ljust(56, b"\0") + (0).to_bytes(8, "little")
        head += member.public_raw
        sig = member.sign(b"peerlearn-greeting\0" + link.binding + head)
        link.send(torch.frombuffer(bytearray(head + sig), dtype=torch.uint8), GREETING_OP,
                  timeout=5)
        assert wait_for(lambda: acceptor.bad_greetings == 1)
        with pytest.raises(TimeoutError):
            acceptor.incoming(victim.peer_id, timeout=0.3)
    finally:
        link.close()


def test_a_greeting_recorded_on_one_link_fails_on_another(acceptor):
    x = identity()
    first, second = _raw_link(acceptor), _raw_link(acceptor)
    try:
        assert first.binding != second.binding
        # x's genuine greeting, signed for the first link, replayed on the second.
        head = x.peer_id.encode().ljust(56, b"\0") + (0).to_bytes(8, "little") + x.public_raw
        sig = x.sign(b"peerlearn-greeting\0" + first.binding + head)
        second.send(torch.frombuffer(bytearray(head + sig), dtype=torch.uint8), GREETING_OP,
                    timeout=5)
        assert wait_for(lambda: acceptor.bad_greetings == 1)
        with pytest.raises(TimeoutError):
            acceptor.incoming(x.peer_id, timeout=0.3)
    finally:
        first.close()
        second.close()


def test_an_unsigned_greeting_is_refused_by_a_peer_with_an_identity(acceptor):
    x = identity()
    link = _raw_link(acceptor)
    try:
        send_greeting(link, x.peer_id, 0, 5)
        assert wait_for(lambda: acceptor.bad_greetings == 1)
        with pytest.raises(TimeoutError):
            acceptor.incoming(x.peer_id, timeout=0.3)
    finally:
        link.close()


def test_both_ends_of_a_link_share_its_binding():
    with LinkListener("127.0.0.1", 0, KEY) as listener:
        links = [connect_link(*listener.address, KEY, 3, timeout=5) for _ in range(2)]
        accepted = [listener.accept_link(timeout=5) for _ in range(2)]
        by_id = {link.link_id: link for link in accepted}
        for link in links:
            assert by_id[link.link_id].binding == link.binding and len(link.binding) == 32
            link.close()
        assert links[0].binding != links[1].binding
        for link in accepted:
            link.close()


def test_a_receive_moves_to_the_link_that_replaces_its_own(acceptor):
    x = identity()
    sender = PeerLinks(x.peer_id, "127.0.0.1", 0, KEY, 2, identity=x)
    try:
        old = sender.outgoing(acceptor.my_id, address(acceptor))
        assert wait_for(lambda: (x.peer_id, 0) in acceptor._in)
        got = torch.zeros(64)
        box: dict = {}

        def receive():
            try:
                acceptor.recv_into(x.peer_id, got, 7, channel=0, timeout=10)
                box["ok"] = True
            except BaseException as e:  # noqa: BLE001 - checked below
                box["error"] = e

        t = threading.Thread(target=receive)
        t.start()
        time.sleep(0.3)  # the receive is waiting on the old link
        # The sender drops its old link (say it saw it unhealthy) and connects
        # afresh: the acceptor files the new link and closes the old one.
        sender._out.clear()
        new = sender.outgoing(acceptor.my_id, address(acceptor))
        assert new is not old
        new.send(torch.full((64,), 3.0), 7, timeout=5)
        t.join(10)
        assert box.get("ok"), box.get("error")
        assert torch.equal(got, torch.full((64,), 3.0))
    finally:
        sender.close()
