"""The handshake as a pure exchange of bytes: no sockets."""

import pytest

from peerlearn.wire import handshake as hs

SECRET = b"k" * 32


def run(client_secret=SECRET, server_secret=SECRET):
    c = hs.ClientHandshake(client_secret, b"L" * 16, 2, 4)
    s = hs.ServerHandshake(server_secret)
    challenge = s.on_hello(c.hello())
    proof = c.on_challenge(challenge)
    info, accept = s.on_proof(proof)
    c.on_accept(accept)
    return info


def test_matching_secrets_authenticate_both_ways():
    assert run() == hs.LinkHello(link_id=b"L" * 16, conn_index=2, n_conns=4)


def test_client_detects_server_without_secret():
    with pytest.raises(hs.HandshakeError, match="server does not know"):
        run(server_secret=b"x" * 32)


def test_server_detects_client_without_secret():
    c = hs.ClientHandshake(b"x" * 32, b"L" * 16, 0, 1)
    s = hs.ServerHandshake(SECRET)
    challenge = s.on_hello(c.hello())
    # The client cannot verify the challenge, so forge a proof the way a stranger would.
    with pytest.raises(hs.HandshakeError, match="client does not know"):
        s.on_proof(b"\x00" * 32)
    with pytest.raises(hs.HandshakeError):
        c.on_challenge(challenge)


def test_replayed_proof_fails_against_a_fresh_challenge():
    c = hs.ClientHandshake(SECRET, b"L" * 16, 0, 1)
    s1 = hs.ServerHandshake(SECRET)
    proof = c.on_challenge(s1.on_hello(c.hello()))
    s1.on_proof(proof)
    s2 = hs.ServerHandshake(SECRET)  # new server nonce
    s2.on_hello(c.hello())
    with pytest.raises(hs.HandshakeError):
        s2.on_proof(proof)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h[:-1],
        lambda h: h + b"\x00",
        lambda h: b"XXXX" + h[4:],
        lambda h: h[:4] + b"\x02" + h[5:],  # version
        lambda h: h[:5] + b"\x01" + h[6:],  # reserved
        lambda h: h[:6] + (5).to_bytes(2, "little") + (4).to_bytes(2, "little") + h[10:],
        lambda h: h[:8] + (0).to_bytes(2, "little") + h[10:],  # n_conns 0
        lambda h: h[:8] + (300).to_bytes(2, "little") + h[10:],  # n_conns > limit
    ],
)
def test_malformed_hello_is_rejected(mutate):
    hello = hs.ClientHandshake(SECRET, b"L" * 16, 2, 4).hello()
    with pytest.raises(hs.HandshakeError):
        hs.ServerHandshake(SECRET).on_hello(mutate(hello))


def test_short_secrets_are_refused():
    with pytest.raises(ValueError):
        hs.ServerHandshake(b"short")


def test_proof_before_hello_is_an_error():
    with pytest.raises(hs.HandshakeError):
        hs.ServerHandshake(SECRET).on_proof(b"\x00" * 32)


def test_bad_accept_and_challenge():
    c = hs.ClientHandshake(SECRET, b"L" * 16, 0, 1)
    with pytest.raises(hs.HandshakeError):
        c.on_challenge(b"PLC1" + b"\x00" * 10)
    with pytest.raises(hs.HandshakeError):
        c.on_accept(b"NOPE")
