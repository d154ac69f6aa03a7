"""The zmq control plane on loopback: admission, sender binding, hostile frames."""

import asyncio

import pytest
import zmq
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from peerlearn.state.identity import Identity
from peerlearn.transport import keys
from peerlearn.transport.control import ControlPlane
from peerlearn.wire import control as m

SECRET = b"control-plane-test-secret-123456"


def ident(tmp_path, name):
    return Identity.load_or_create(tmp_path / name)


def beat(i: Identity):
    return m.Heartbeat(1, 0, 0, 2, b"\0" * 8, True, m.PeerInfo(i.peer_id, "h:1", "h:2"))


async def recv_or_none(plane, timeout):
    try:
        return await asyncio.wait_for(plane.recv(), timeout)
    except TimeoutError:
        return None


def test_curve_key_derivation_matches_x25519(tmp_path):
    i = ident(tmp_path, "a")
    pub, sec = keys.curve_keypair_from_ed25519(i.private_key)
    assert X25519PrivateKey.from_private_bytes(sec).public_key().public_bytes_raw() == pub
    assert keys.curve_public_from_ed25519(i.public_raw) == pub
    with pytest.raises(ValueError):
        keys.curve_public_from_ed25519(b"\xff" * 32)


def test_messages_flow_with_the_sender_bound_to_its_key(tmp_path):
    async def main():
        a, b = ident(tmp_path, "a"), ident(tmp_path, "b")
        pa = ControlPlane(a, "127.0.0.1", 0, secret=SECRET)
        pb = ControlPlane(b, "127.0.0.1", 0, secret=SECRET)
        try:
            pa.send(f"127.0.0.1:{pb.port}", beat(a))
            sender, msg = await asyncio.wait_for(pb.recv(), 5)
            assert sender == a.peer_id and msg == beat(a)
            pb.send(f"127.0.0.1:{pa.port}", m.Leave())
            assert await asyncio.wait_for(pa.recv(), 5) == (b.peer_id, m.Leave())
        finally:
            pa.close()
            pb.close()

    asyncio.run(main())


def test_stranger_without_the_secret_is_refused_and_counted(tmp_path):
    async def main():
        b = ident(tmp_path, "b")
        pb = ControlPlane(b, "127.0.0.1", 0, secret=SECRET)
        watch = asyncio.ensure_future(pb.watch_handshakes())
        stranger = ControlPlane(ident(tmp_path, "s"), "127.0.0.1", 0,
                                secret=b"wrong-secret-wrong-secret-wrong!")
        try:
            stranger.send(f"127.0.0.1:{pb.port}", m.Leave())
            assert await recv_or_none(pb, 1.5) is None
            assert pb.refused_connections >= 1
        finally:
            watch.cancel()
            stranger.close()
            pb.close()

    asyncio.run(main())


def test_allowlist_admits_listed_keys_only(tmp_path):
    async def main():
        a, b, c = ident(tmp_path, "a"), ident(tmp_path, "b"), ident(tmp_path, "c")
        allow = [a.public_raw, b.public_raw]
        pb = ControlPlane(b, "127.0.0.1", 0, allowlist=allow)
        pa = ControlPlane(a, "127.0.0.1", 0, allowlist=allow)
        pc = ControlPlane(c, "127.0.0.1", 0, allowlist=allow)  # knows the (public) list
        try:
            pc.send(f"127.0.0.1:{pb.port}", beat(c), to=b.peer_id)
            pa.send(f"127.0.0.1:{pb.port}", beat(a), to=b.peer_id)
            sender, _ = await asyncio.wait_for(pb.recv(), 5)
            assert sender == a.peer_id
            assert await recv_or_none(pb, 1.0) is None
            assert pb.refused_connections >= 1
            # Each peer presents its own server key: c cannot answer as b, so a
            # message meant for b that reaches c's address goes nowhere ...
            pa.send(f"127.0.0.1:{pc.port}", beat(a), to=b.peer_id)
            assert await recv_or_none(pc, 1.0) is None
            # ... and a message for a peer not on the list is not even sent
            dropped = pa.dropped_sends
            pa.send(f"127.0.0.1:{pb.port}", beat(a), to=c.peer_id)
            pa.send(f"127.0.0.1:{pb.port}", beat(a))
            assert pa.dropped_sends == dropped + 2
        finally:
            for p in (pa, pb, pc):
                p.close()

    asyncio.run(main())


def raw_dealer(plane_ctx, identity, server_port, secret):
    """A CURVE client that knows the secret but writes frames by hand."""
    pub, sec = keys.curve_keypair_from_ed25519(identity.private_key)
    spub, _ = keys.swarm_server_keypair(secret)
    d = plane_ctx.socket(zmq.DEALER)
    d.curve_serverkey, d.curve_publickey, d.curve_secretkey = spub, pub, sec
    d.linger = 0
    d.connect(f"tcp://127.0.0.1:{server_port}")
    return d


@pytest.mark.parametrize("kind", ["impersonation", "garbage", "short", "multipart"])
def test_hostile_frames_are_dropped_and_counted(tmp_path, kind):
    async def main():
        a, b, victim = ident(tmp_path, "a"), ident(tmp_path, "b"), ident(tmp_path, "v")
        pb = ControlPlane(b, "127.0.0.1", 0, secret=SECRET)
        d = raw_dealer(pb.ctx, a, pb.port, SECRET)
        try:
            body = m.encode(beat(victim))
            frames = {
                "impersonation": [victim.public_raw + body],  # a speaks as victim
                "garbage": [a.public_raw + b"\xc1\x00garbage"],
                "short": [b"\x01" * 10],
                "multipart": [a.public_raw + body, b"extra"],
            }[kind]
            await d.send_multipart(frames)
            await d.send(a.public_raw + m.encode(beat(a)))  # then a valid one
            sender, msg = await asyncio.wait_for(pb.recv(), 5)
            assert sender == a.peer_id and msg == beat(a)
            assert pb.rejected_messages == 1
        finally:
            d.close()
            pb.close()

    asyncio.run(main())


def _closed_by_peer(s, timeout: float) -> bool:
    """Reads s until EOF (True) or until timeout passes with it open (False)."""
    import select
    import time as _time
    deadline = _time.monotonic() + timeout
    while (left := deadline - _time.monotonic()) > 0:
        if select.select([s], [], [], left)[0]:
            try:
                if not s.recv(4096):
                    return True
            except ConnectionResetError:
                return True
    return False


def test_incoming_connections_are_bounded_and_a_quieter_prefix_gets_in(tmp_path):
    """A flood of connections from one address holds at most its slots, the
    rest are cut (the descriptor reclaimed) and counted; once all slots are
    held, connections from another prefix take the flooder's oldest, and a
    member there still gets its messages through."""
    import socket
    import time

    async def main():
        b = ident(tmp_path, "b")
        pb = ControlPlane(b, "127.0.0.1", 0, secret=SECRET,
                          inbound_limits={"total": 12, "per_source": 8, "per_prefix": 8})
        watch = asyncio.ensure_future(pb.watch_handshakes())
        flood, other = [], []
        member = None
        try:
            for _ in range(40):  # never greet: idle until cut
                flood.append(socket.create_connection(("127.0.0.1", pb.port)))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if pb.inbound.refused >= 32:
                    break
            assert pb.inbound.held == 8 and pb.inbound.refused == 32
            cut = await asyncio.to_thread(lambda: [_closed_by_peer(s, 0.2) for s in flood])
            assert sum(cut) == 32, "the connections past the cap were not closed"
            assert not any(cut[:8]), "the first 8 of the flood hold the slots"

            # Another prefix (127.0.1.0/24): 4 free slots, then 2 taken from
            # the busiest prefix (8 against 4, then 7 against 5), then none
            # (6 against 6 is fair).
            for i in range(8):
                s = socket.socket()
                s.bind((f"127.0.1.{1 + i}", 0))
                s.connect(("127.0.0.1", pb.port))
                other.append(s)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if pb.inbound.evicted + pb.inbound.refused >= 2 + 32 + 2:
                    break
            assert pb.inbound.evicted == 2 and pb.inbound.refused == 34
            assert pb.inbound.held == 12

            # A member holding the secret, from a third prefix, is let in (it
            # evicts a flood connection) and its message arrives.
            member = ControlPlane(ident(tmp_path, "a"), "127.0.2.1", 0, secret=SECRET)
            member.send(f"127.0.2.1:0;127.0.0.1:{pb.port}", m.Leave())
            sender, msg = await asyncio.wait_for(pb.recv(), 10)
            assert (sender, msg) == (member.peer_id, m.Leave())
            assert pb.inbound.evicted == 3 and pb.inbound.held == 12

            # Closed connections free their slots.
            for s in flood + other:
                s.close()
            deadline = time.monotonic() + 10
            while pb.inbound.held > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert pb.inbound.held == 1  # the member's
        finally:
            watch.cancel()
            for s in flood + other:
                s.close()
            if member is not None:
                member.close()
            pb.close()

    asyncio.run(main())


def test_a_peer_that_cannot_be_dialled_is_answered_on_its_own_connection(tmp_path):
    """Dial-back (a peer behind NAT): it advertises no reachable address,
    opens the connection itself and says DialBack; the other side answers on
    that connection, each message signed for it; the dial-back peer learns
    the sender from the signature. A message nobody asked for is dropped and
    counted; a signature made for another connection is refused."""
    from peerlearn.transport import dialback

    async def main():
        a, b = ident(tmp_path, "a"), ident(tmp_path, "b")
        nat = ControlPlane(a, "127.0.0.1", 0, secret=SECRET, dial_back=True)
        pub = ControlPlane(b, "127.0.0.1", 0, secret=SECRET)
        try:
            # Before it asked: nowhere to send, counted.
            pub.send(m.DIAL_BACK, m.Leave(), to=a.peer_id)
            assert pub.dropped_sends == 1

            nat.send(f"127.0.0.1:{pub.port}", beat(a))
            sender, msg = await asyncio.wait_for(pub.recv(), 5)
            assert (sender, msg) == (a.peer_id, beat(a))  # DialBack itself is not returned

            pub.send(m.DIAL_BACK, beat(b), to=a.peer_id)
            sender, msg = await asyncio.wait_for(nat.recv(), 5)
            assert (sender, msg) == (b.peer_id, beat(b))

            # A frame whose signature was made for another nonce is refused.
            routing_id, nonce = pub._routes.get(a.peer_id)
            body = m.encode(m.Leave())
            forged = b.public_raw + dialback.sign(b.private_key, b"\1" * 16, body) + body
            pub._router.send_multipart([routing_id, forged])
            pub.send(m.DIAL_BACK, m.Leave(), to=a.peer_id)
            sender, msg = await asyncio.wait_for(nat.recv(), 5)
            assert (sender, msg) == (b.peer_id, m.Leave())
            assert nat.rejected_messages == 1
        finally:
            nat.close()
            pub.close()

    asyncio.run(main())


def test_two_peers_that_cannot_be_dialled_talk_through_a_member(tmp_path):
    """Neither can open a connection to the other: the sender signs the
    message for its recipient and a member both reach passes it on; the
    recipient checks the origin's signature (the member cannot forge it),
    and one addressed to another peer is refused."""
    from peerlearn.transport import dialback

    async def main():
        a, b, c = ident(tmp_path, "a"), ident(tmp_path, "b"), ident(tmp_path, "c")
        n1 = ControlPlane(a, "127.0.0.1", 0, secret=SECRET, dial_back=True)
        n2 = ControlPlane(b, "127.0.0.1", 0, secret=SECRET, dial_back=True)
        hub = ControlPlane(c, "127.0.0.1", 0, secret=SECRET)
        hub_addr = f"127.0.0.1:{hub.port}"
        try:
            for n, i in ((n1, a), (n2, b)):  # both dial the member (their heartbeats)
                n.send(hub_addr, beat(i))
                assert (await asyncio.wait_for(hub.recv(), 5))[0] == i.peer_id
            n1.forward_via = lambda to: hub_addr

            async def drain():  # the member's receive loop passes messages on
                while True:
                    await hub.recv()
            hub_task = asyncio.ensure_future(drain())
            n1.send(m.DIAL_BACK, beat(a), to=b.peer_id)
            sender, msg = await asyncio.wait_for(n2.recv(), 5)
            assert (sender, msg) == (a.peer_id, beat(a))
            assert hub.forwarded == 1

            # The member passes on a message signed for someone else: refused.
            body = m.encode(m.Leave())
            payload = dialback.forward_payload(a.private_key, c.peer_id, body)
            _, inner = dialback.passed_on(a.public_raw, payload)
            inner = inner[:36] + b.peer_id.encode() + inner[68:]  # re-addressed to b
            hub._route_frame(hub._routes.get(b.peer_id), inner)
            n1.send(m.DIAL_BACK, m.Leave(), to=b.peer_id)
            sender, msg = await asyncio.wait_for(n2.recv(), 5)
            assert (sender, msg) == (a.peer_id, m.Leave())
            assert n2.rejected_messages == 1
            hub_task.cancel()
        finally:
            for p in (n1, n2, hub):
                p.close()

    asyncio.run(main())
