"""A peer's persistent identity: an Ed25519 key pair in its data directory.

The peer id is derived from the public key (first 16 bytes of its SHA-256,
hex), so an id cannot be claimed without the key. The private key file is
written atomically with mode 0600 and never leaves the machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peerlearn.state.atomic import write_atomic

KEY_FILE = "identity.key"


def peer_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:32]


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @staticmethod
    def verify(public_raw: bytes, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
            return True
        except Exception:  # InvalidSignature, or a malformed key from the network
            return False

    @classmethod
    def load_or_create(cls, data_dir: str | Path) -> Identity:
        """Loads data_dir/identity.key, creating it on first start.

        A corrupt key file raises ValueError rather than silently minting a new
        identity: the swarm would see a stranger where a known peer used to be.
        """
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        write_atomic(path, [pem], mode=0o600)
        return cls(key)
