"""Mutual challenge-response authentication for data-plane connections (sans-IO).

Every TCP connection of a striped link opens with this exchange, before any
tensor frame is accepted. Both ends prove knowledge of the swarm secret with
HMAC-SHA256 over fresh nonces from both sides, so a stranger can neither open
a link nor replay a recorded handshake. The exchange is fixed-size, so the
I/O layer only ever reads exact byte counts:

    client -> server  HELLO      58 bytes  magic "PLH1", version, 0, conn_index u16,
                                           n_conns u16, link_id[16], client_nonce[32]
    server -> client  CHALLENGE  68 bytes  magic "PLC1", server_nonce[32], server_proof[32]
    client -> server  PROOF      32 bytes  client_proof
    server -> client  ACCEPT      4 bytes  magic "PLA1"

    server_proof = HMAC(secret, "peerlearn-server" || HELLO || server_nonce)
    client_proof = HMAC(secret, "peerlearn-client" || HELLO || server_nonce)

Threat model: this keeps strangers out and ties every connection of a link to
one authenticated client. It does not encrypt or MAC the bulk frames that
follow (at tens of Gbit/s that is the job of a VPN or TLS terminator); an
attacker able to rewrite TCP segments on path can still corrupt a transfer,
which the swarm's hash checks then detect.

All-integers are little-endian.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

HELLO_MAGIC = b"PLH1"
CHALLENGE_MAGIC = b"PLC1"
ACCEPT_MAGIC = b"PLA1"
VERSION = 1
MAX_CONNS_PER_LINK = 256
MIN_SECRET_BYTES = 16

_HELLO = struct.Struct("<4sBBHH16s32s")
HELLO_BYTES = _HELLO.size  # 58
CHALLENGE_BYTES = 4 + 32 + 32
PROOF_BYTES = 32
ACCEPT_BYTES = 4


class HandshakeError(Exception):
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


def _mac(secret: bytes, label: bytes, hello: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, label + hello + server_nonce, hashlib.sha256).digest()


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
    """The connecting side. Call hello(), then on_challenge(), then on_accept()."""

    def __init__(self, secret: bytes, link_id: bytes, conn_index: int, n_conns: int):
        self._secret = _check_secret(secret)
        if len(link_id) != 16:
            raise ValueError("link_id must be 16 bytes")
        self._hello = _HELLO.pack(
            HELLO_MAGIC, VERSION, 0, conn_index, n_conns, link_id, secrets.token_bytes(32)
        )
        parse_hello(self._hello)  # the same limits apply to what we send

    def hello(self) -> bytes:
        return self._hello

    def on_challenge(self, data: bytes) -> bytes:
        """Verifies the server's proof and returns our PROOF message."""
        if len(data) != CHALLENGE_BYTES or data[:4] != CHALLENGE_MAGIC:
            raise HandshakeError("malformed CHALLENGE")
        server_nonce, server_proof = data[4:36], data[36:68]
        expect = _mac(self._secret, b"peerlearn-server", self._hello, server_nonce)
        if not hmac.compare_digest(expect, server_proof):
            raise HandshakeError("the server does not know the swarm secret")
        return _mac(self._secret, b"peerlearn-client", self._hello, server_nonce)

    def on_accept(self, data: bytes) -> None:
        if data != ACCEPT_MAGIC:
            raise HandshakeError("the server did not accept the connection")


class ServerHandshake:
    """The accepting side. Call on_hello(), then on_proof()."""

    def __init__(self, secret: bytes):
        self._secret = _check_secret(secret)
        self._hello: bytes | None = None
        self._nonce = secrets.token_bytes(32)
        self._info: LinkHello | None = None

    def on_hello(self, data: bytes) -> bytes:
        """Validates HELLO and returns the CHALLENGE to send."""
        self._info = parse_hello(data)
        self._hello = bytes(data)
        proof = _mac(self._secret, b"peerlearn-server", self._hello, self._nonce)
        return CHALLENGE_MAGIC + self._nonce + proof

    def on_proof(self, data: bytes) -> tuple[LinkHello, bytes]:
        """Checks the client's proof; returns what it declared and the ACCEPT to send."""
        if self._hello is None or self._info is None:
            raise HandshakeError("PROOF before HELLO")
        expect = _mac(self._secret, b"peerlearn-client", self._hello, self._nonce)
        if len(data) != PROOF_BYTES or not hmac.compare_digest(expect, bytes(data)):
            raise HandshakeError("the client does not know the swarm secret")
        return self._info, ACCEPT_MAGIC
