"""What a swarm secret must be, and how to make one.

A secret swarm's only credential is its secret, and whoever can watch a
handshake (a data link's client proof, a CURVE HELLO on the control plane)
can test guesses against it offline. The slow KDF in transport.keys makes
each guess cost tens of milliseconds, but no KDF rescues a secret drawn from
a small space (a passphrase fell in 8,522 guesses), so the library refuses
secrets that cannot carry 128 bits of randomness.

The rule, applied to the secret's bytes exactly as given:

  1. at least 16 bytes (and at most 1024);
  2. length x bits-per-symbol >= 128, where bits-per-symbol is log2 of the
     smallest standard alphabet holding every symbol: digits (10), hex
     (16, one case), lowercase letters (26), lowercase + digits (36),
     base64 / base64url with '=' padding (64), printable ASCII (95), else
     raw bytes (256). So the shortest accepted secrets are 32 hex digits,
     22 base64url characters, 20 printable characters or 16 raw bytes;
  3. not obviously patterned: at least 6 distinct symbols, no symbol making
     up more than half of it, and not one block repeated.

Rule 3 only catches the obvious; it rejects a randomly generated secret of
the sizes above with probability below 1e-9. A passphrase of dictionary
words passes rules 1-3 if long enough but is still weak: use
`peerlearn secret new`, which draws 256 bits from the OS.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import math
import secrets
import string
from collections import Counter

MIN_SECRET_BYTES = 16
MIN_SECRET_BITS = 128
MAX_SECRET_BYTES = 1024  # bounds the pattern check below (quadratic in the length)

# Smallest first: a secret is credited with the first alphabet that holds it.
_ALPHABETS: list[tuple[str, frozenset[int]]] = [
    (name, frozenset(chars.encode()))
    for name, chars in [
        ("digits", string.digits),
        ("hex", "0123456789abcdef"),
        ("hex", "0123456789ABCDEF"),
        ("lowercase letters", string.ascii_lowercase),
        ("lowercase letters and digits", string.ascii_lowercase + string.digits),
        ("base64", string.ascii_letters + string.digits + "-_+/="),
        ("printable ASCII", "".join(chr(c) for c in range(0x20, 0x7F))),
    ]
]
_SIZES = {"digits": 10, "hex": 16, "lowercase letters": 26,
          "lowercase letters and digits": 36, "base64": 64, "printable ASCII": 95}


class WeakSecretError(PeerlearnError, ValueError):
    """The secret cannot carry 128 bits of randomness; the message says why."""


def _alphabet(secret: bytes) -> tuple[str, int]:
    used = set(secret)
    for name, chars in _ALPHABETS:
        if used <= chars:
            return name, _SIZES[name]
    return "raw bytes", 256


def _is_repeated_block(secret: bytes) -> bool:
    n = len(secret)
    return any(secret == (secret[:k] * (n // k + 1))[:n] for k in range(1, n // 2 + 1))


def check_secret(secret: bytes) -> bytes:
    """Returns the secret as bytes if it passes the rule above, else raises
    WeakSecretError with a one-line reason (never echoing the secret)."""
    if not isinstance(secret, (bytes, bytearray)):
        raise WeakSecretError("the swarm secret must be bytes")
    secret = bytes(secret)
    hint = "; make one with `peerlearn secret new`"
    if len(secret) < MIN_SECRET_BYTES:
        raise WeakSecretError(f"the swarm secret is {len(secret)} bytes, at least "
                              f"{MIN_SECRET_BYTES} are needed{hint}")
    if len(secret) > MAX_SECRET_BYTES:
        raise WeakSecretError(f"the swarm secret is {len(secret)} bytes, at most "
                              f"{MAX_SECRET_BYTES} are allowed")
    name, size = _alphabet(secret)
    bits = len(secret) * math.log2(size)
    if bits < MIN_SECRET_BITS:
        need = math.ceil(MIN_SECRET_BITS / math.log2(size))
        raise WeakSecretError(
            f"the swarm secret is {len(secret)} symbols of {name}, at most {bits:.0f} bits; "
            f"at least {need} such symbols are needed for {MIN_SECRET_BITS} bits{hint}")
    counts = Counter(secret)
    if len(counts) < 6 or max(counts.values()) * 2 > len(secret) or _is_repeated_block(secret):
        raise WeakSecretError(f"the swarm secret is a repetitive pattern, not random{hint}")
    return secret


def new_secret() -> str:
    """A fresh secret: 256 bits from the OS, base64url (43 characters)."""
    return secrets.token_urlsafe(32)
