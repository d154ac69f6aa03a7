"""Key material for the control plane, derived from what a peer already has.

A peer's CURVE (X25519) key pair is derived from its Ed25519 identity the
standard way (the private scalar from SHA-512 of the seed; the public point by
the Edwards-to-Montgomery map), so anyone holding a peer's Ed25519 public key
can compute the CURVE key it will present, and an allowlist of Ed25519 keys is
enough for the ZAP authenticator.

The CURVE *server* key pair a peer's control socket presents:
  * secret mode: one per swarm, derived from the swarm secret. A CURVE client
    must know the server's public key to complete the handshake, and that key
    never crosses the wire, so a stranger without the secret cannot even
    connect.
  * allowlist mode: the peer's own (above); a client names the peer it
    expects, and admission is decided by the ZAP authenticator on the
    client's key.

Everything a secret swarm derives from its secret goes through one slow,
salted KDF (scrypt, see swarm_master_key): a recorded data-link client proof
or a recorded CURVE HELLO lets an eavesdropper test guesses offline, and the
KDF makes each guess cost what it costs us once per process.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from zmq.utils import z85

from peerlearn.transport.swarm_secret import check_secret

_P = 2**255 - 19


def _raw_private(k: X25519PrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())


def _raw_public(k: X25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _clamp(scalar: bytes) -> bytes:
    b = bytearray(scalar[:32])
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def curve_keypair_from_ed25519(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """(public, secret), 32 raw bytes each, for this identity's CURVE sockets."""
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    x = X25519PrivateKey.from_private_bytes(_clamp(hashlib.sha512(seed).digest()))
    return _raw_public(x), _raw_private(x)


def curve_public_from_ed25519(public_raw: bytes) -> bytes:
    """The Montgomery u = (1 + y) / (1 - y) of an Ed25519 public key (32 raw bytes).

    Raises ValueError for a key that is not a valid point encoding.
    """
    if len(public_raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    y = int.from_bytes(public_raw, "little") & ((1 << 255) - 1)
    if y >= _P or y == 1:
        raise ValueError("not an Ed25519 public key")
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


# scrypt cost: 64 MiB and ~0.15 s on one core (measured on the dev box), once
# per process. The salt is fixed because the secret is per swarm (no
# precomputed table spans swarms whose secrets are 128-bit random), and
# domain-separating, so this KDF's output is useless to any other protocol.
# Changing any of these changes every key: it is a protocol version bump.
KDF_SALT = b"peerlearn swarm secret kdf v1\0"
KDF_N, KDF_R, KDF_P = 1 << 16, 8, 1


@functools.lru_cache(maxsize=8)
def swarm_master_key(secret: bytes) -> bytes:
    """32 bytes: scrypt(secret, KDF_SALT, N=2^16, r=8, p=1).

    Invariant: computed once per process per secret (cached), never per
    connection. Raises WeakSecretError (a ValueError) for a secret that
    fails the strength rule in transport.swarm_secret.
    """
    secret = check_secret(secret)
    return Scrypt(salt=KDF_SALT, length=32, n=KDF_N, r=KDF_R, p=KDF_P).derive(secret)


def _subkey(secret: bytes, label: bytes) -> bytes:
    return hmac.new(swarm_master_key(bytes(secret)), label, hashlib.sha256).digest()


def swarm_server_keypair(secret: bytes) -> tuple[bytes, bytes]:
    """The CURVE server key pair every peer of a secret swarm binds with."""
    if not secret:
        raise ValueError("only a secret swarm shares a server key")
    x = X25519PrivateKey.from_private_bytes(_subkey(secret, b"peerlearn-control-server"))
    return _raw_public(x), _raw_private(x)


def data_secret(secret: bytes) -> bytes:
    """The data plane's link key in a secret swarm: a KDF subkey, so the swarm
    secret itself never authenticates a stream link and each offline guess
    against a recorded handshake costs one scrypt evaluation.

    An allowlist swarm's link key is 32 random bytes shared over the
    authenticated control plane; it is used as is and never comes here.
    """
    return _subkey(secret, b"peerlearn-data-plane")


class ZapAdmission:
    """ZAP policy: any key in secret mode (CURVE already proved the secret),
    else only the CURVE keys of allowlisted identities."""

    def __init__(self, allowed: set[bytes] | None):
        self.allowed = allowed
        self.denied = 0

    def callback(self, domain, z85_key) -> bool:
        if self.allowed is None:
            return True
        ok = z85.decode(z85_key) in self.allowed
        self.denied += not ok
        return ok
