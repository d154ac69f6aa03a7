"""Mutual challenge-response authentication for data-plane connections (sans-IO).

Every TCP connection of a striped link opens with this exchange, before any
tensor frame is accepted. Both ends prove knowledge of the link key with
HMAC-SHA256 over fresh nonces from both sides, so a stranger can neither open
a link nor replay a recorded handshake. The exchange is fixed-size, so the
I/O layer only ever reads exact byte counts:

    client -> server  HELLO      58 bytes  magic "PLH1", version 2, 0, conn_index u16,
                                           n_conns u16, link_id[16], client_nonce[32]
    server -> client  CHALLENGE  36 bytes  magic "PLC1", server_nonce[32]
    client -> server  PROOF      32 bytes  client_proof
    server -> client  ACCEPT     36 bytes  magic "PLA1", server_proof[32]

    client_proof = HMAC(key, "peerlearn-client" || HELLO || server_nonce)
    server_proof = HMAC(key, "peerlearn-server" || HELLO || server_nonce || client_proof)

The client proves itself first. Until a client has sent a valid proof, the
server sends nothing that depends on the key (only a random nonce), so a
stranger who connects learns nothing it could test guesses against. A
client still proves itself to whatever server it reaches, so an on-path
attacker can record a client proof; that is why a secret swarm's link key is
a slow KDF of the secret (transport.keys.data_secret): each offline guess
costs one scrypt evaluation.

Threat model: this keeps strangers out and ties every connection of a link to
one authenticated client. It does not encrypt or MAC the bulk frames that
follow (at tens of Gbit/s that is the job of a VPN or TLS terminator); an
attacker able to rewrite TCP segments on path can still corrupt a transfer,
which the swarm's hash checks then detect.

All integers are little-endian.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

HELLO_MAGIC = b"PLH1"
CHALLENGE_MAGIC = b"PLC1"
ACCEPT_MAGIC = b"PLA1"
VERSION = 2  # 2: the client proves itself first (1 let strangers collect server proofs)
MAX_CONNS_PER_LINK = 256
MIN_SECRET_BYTES = 16

_HELLO = struct.Struct("<4sBBHH16s32s")
HELLO_BYTES = _HELLO.size  # 58
CHALLENGE_BYTES = 4 + 32
PROOF_BYTES = 32
ACCEPT_BYTES = 4 + 32


class HandshakeError(PeerlearnError):
    """The other end failed to authenticate or spoke another protocol."""


@dataclass(frozen=True)
class LinkHello:
    """What an authenticated client declared about the connection it opened."""

    link_id: bytes
    conn_index: int
    n_conns: int


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the swarm secret must be at least {MIN_SECRET_BYTES} bytes")
    return bytes(secret)


def _client_proof(key: bytes, hello: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, b"peerlearn-client" + hello + server_nonce, hashlib.sha256).digest()


def _server_proof(key: bytes, hello: bytes, server_nonce: bytes, client_proof: bytes) -> bytes:
    # Distinct label and the client's proof in the input: a server proof can
    # never be reflected back as a client proof, or the reverse.
    msg = b"peerlearn-server" + hello + server_nonce + client_proof
    return hmac.new(key, msg, hashlib.sha256).digest()


def parse_hello(data: bytes) -> LinkHello:
    """Validates a HELLO message; raises HandshakeError on anything off."""
    if len(data) != HELLO_BYTES:
        raise HandshakeError(f"HELLO must be {HELLO_BYTES} bytes, got {len(data)}")
    magic, version, reserved, idx, n, link_id, _nonce = _HELLO.unpack(data)
    if magic != HELLO_MAGIC:
        raise HandshakeError("not a peerlearn stream connection (bad HELLO magic)")
    if version != VERSION or reserved != 0:
        raise HandshakeError(f"unsupported stream protocol version {version}")
    if not 1 <= n <= MAX_CONNS_PER_LINK or idx >= n:
        raise HandshakeError(f"connection index {idx} of {n} is out of range")
    return LinkHello(link_id=link_id, conn_index=idx, n_conns=n)


class ClientHandshake:
    """The connecting side. Call hello(), then on_challenge(), then on_accept().

    Invariant: on_accept() returns only if the server proved the key over this
    connection's HELLO, its own nonce and our proof.
    """

    def __init__(self, secret: bytes, link_id: bytes, conn_index: int, n_conns: int):
        self._secret = _check_secret(secret)
        if len(link_id) != 16:
            raise ValueError("link_id must be 16 bytes")
        self._hello = _HELLO.pack(
            HELLO_MAGIC, VERSION, 0, conn_index, n_conns, link_id, secrets.token_bytes(32)
        )
        parse_hello(self._hello)  # the same limits apply to what we send
        self._expect: bytes | None = None

    def hello(self) -> bytes:
        return self._hello

    def on_challenge(self, data: bytes) -> bytes:
        """Takes the server's nonce and returns our PROOF message."""
        if len(data) != CHALLENGE_BYTES or data[:4] != CHALLENGE_MAGIC:
            raise HandshakeError("malformed CHALLENGE")
        server_nonce = bytes(data[4:])
        proof = _client_proof(self._secret, self._hello, server_nonce)
        self._expect = _server_proof(self._secret, self._hello, server_nonce, proof)
        return proof

    def on_accept(self, data: bytes) -> None:
        """Verifies the server's proof; raises HandshakeError unless it holds."""
        if self._expect is None:
            raise HandshakeError("ACCEPT before CHALLENGE")
        if len(data) != ACCEPT_BYTES or data[:4] != ACCEPT_MAGIC:
            raise HandshakeError("the server did not accept the connection")
        if not hmac.compare_digest(self._expect, bytes(data[4:])):
            raise HandshakeError("the server does not know the swarm secret")


class ServerHandshake:
    """The accepting side. Call on_hello(), then on_proof().

    Invariant: nothing it returns depends on the key until on_proof() has
    verified the client's proof.
    """

    def __init__(self, secret: bytes):
        self._secret = _check_secret(secret)
        self._hello: bytes | None = None
        self._nonce = secrets.token_bytes(32)
        self._info: LinkHello | None = None

    def on_hello(self, data: bytes) -> bytes:
        """Validates HELLO and returns the CHALLENGE (our nonce only) to send."""
        self._info = parse_hello(data)
        self._hello = bytes(data)
        return CHALLENGE_MAGIC + self._nonce

    def on_proof(self, data: bytes) -> tuple[LinkHello, bytes]:
        """Checks the client's proof; returns what it declared and the ACCEPT
        (carrying our proof) to send."""
        if self._hello is None or self._info is None:
            raise HandshakeError("PROOF before HELLO")
        data = bytes(data)
        expect = _client_proof(self._secret, self._hello, self._nonce)
        if len(data) != PROOF_BYTES or not hmac.compare_digest(expect, data):
            raise HandshakeError("the client does not know the swarm secret")
        return self._info, ACCEPT_MAGIC + _server_proof(self._secret, self._hello, self._nonce,
                                                        data)
