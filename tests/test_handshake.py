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


def test_server_refuses_a_client_with_another_key():
    with pytest.raises(hs.HandshakeError, match="client does not know"):
        run(server_secret=b"x" * 32)


def test_client_detects_a_server_that_accepts_without_the_key():
    c = hs.ClientHandshake(SECRET, b"L" * 16, 0, 1)
    c.on_challenge(hs.CHALLENGE_MAGIC + b"n" * 32)
    # An impostor cannot compute the server proof; it can only send something.
    with pytest.raises(hs.HandshakeError, match="server does not know"):
        c.on_accept(hs.ACCEPT_MAGIC + b"\x00" * 32)
    # Nor can it pass off the client's own proof (reflection).
    c = hs.ClientHandshake(SECRET, b"L" * 16, 0, 1)
    proof = c.on_challenge(hs.CHALLENGE_MAGIC + b"n" * 32)
    with pytest.raises(hs.HandshakeError, match="server does not know"):
        c.on_accept(hs.ACCEPT_MAGIC + proof)


def test_a_stranger_learns_nothing_that_depends_on_the_key(monkeypatch):
    """The offline-guessing oracle: whatever the server sends before the
    client has proved the key must be the same whatever the key is, or a
    stranger could record it and test guesses at leisure."""
    monkeypatch.setattr(hs.secrets, "token_bytes", lambda n: b"N" * n)
    hello = hs.ClientHandshake(SECRET, b"L" * 16, 0, 1).hello()
    seen = []
    for key in (SECRET, b"x" * 32):
        server = hs.ServerHandshake(key)
        sent = server.on_hello(hello)
        with pytest.raises(hs.HandshakeError):
            server.on_proof(b"\x00" * 32)  # the stranger's best effort: no ACCEPT comes back
        seen.append(sent)
    assert seen[0] == seen[1] == hs.CHALLENGE_MAGIC + b"N" * 32


def test_server_proof_is_only_sent_after_a_valid_client_proof():
    c = hs.ClientHandshake(SECRET, b"L" * 16, 0, 1)
    s = hs.ServerHandshake(SECRET)
    challenge = s.on_hello(c.hello())
    assert len(challenge) == hs.CHALLENGE_BYTES == 36
    _, accept = s.on_proof(c.on_challenge(challenge))
    assert len(accept) == hs.ACCEPT_BYTES and accept[:4] == hs.ACCEPT_MAGIC
    c.on_accept(accept)


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
        lambda h: h[:4] + b"\x01" + h[5:],  # version 1: the server proved itself first
        lambda h: h[:4] + b"\x03" + h[5:],  # version
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
    with pytest.raises(hs.HandshakeError):  # ACCEPT before CHALLENGE proves nothing
        c.on_accept(hs.ACCEPT_MAGIC + b"\x00" * 32)


def test_link_key_is_a_cached_scrypt_of_the_secret(monkeypatch):
    """A recorded client proof must cost the attacker one slow KDF per guess:
    the link key is HMAC(scrypt(secret), label), computed once per process."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    from peerlearn.transport import keys

    secret = b"handshake-kdf-test-secret-0123456789"
    master = Scrypt(salt=keys.KDF_SALT, length=32, n=1 << 16, r=8, p=1).derive(secret)
    expect = hmac.new(master, b"peerlearn-data-plane", hashlib.sha256).digest()
    keys.swarm_master_key.cache_clear()
    assert keys.data_secret(secret) == expect
    assert keys.data_secret(secret) == expect
    keys.swarm_server_keypair(secret)
    info = keys.swarm_master_key.cache_info()
    assert (info.misses, info.hits) == (1, 2)  # one scrypt for the data and control keys
    assert keys.data_secret(secret) != hashlib.sha256(b"peerlearn-data-plane\0" + secret).digest()
