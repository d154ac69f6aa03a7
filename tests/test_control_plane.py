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
