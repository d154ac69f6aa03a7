"""Control messages to a peer that cannot be dialled (helpers of control.py).

A peer behind a NAT (no forwarded port) advertises `wire.control.DIAL_BACK`
as its control address. It opens the connections itself (a DEALER to each
member it talks to, as every peer does) and says on each, first and then
every HELLO_EVERY_S, `DialBack(nonce)`: "answer me here". The member's
ROUTER files that connection's routing id under the sender's id (bound to
its CURVE key, as for every message it receives) with the nonce, and what it
has for that peer goes back on the connection.

Why signatures: on the dialling side the connection proves only that the far
end holds the swarm secret (in a secret swarm every ROUTER presents the
swarm's key), not who it is. So each message sent back is signed (Ed25519)
by its sender over the connection's nonce and the message: the dial-back
peer learns the sender from the signature, as a ROUTER learns it from the
CURVE key, and a message signed for one connection is refused on another.
Within one connection, a member holding the secret that sits on the path
could replay earlier messages; the round logic takes stale messages as it
takes late ones (epochs, terms, round ids).

Bounds: routes are an LRU of MAX_ROUTES ids, refreshed by every message from
their peer (a zmq reconnect comes with a new routing id); a frame sent back
is 96 bytes longer than a plain one.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey, Ed25519PublicKey)

MAX_ROUTES = 4096
HELLO_EVERY_S = 1.0
NONCE_BYTES = 16
SIG_BYTES = 64
_CONTEXT = b"peerlearn-dial-back\0"


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def sign(key: Ed25519PrivateKey, nonce: bytes, body: bytes) -> bytes:
    return key.sign(_CONTEXT + nonce + body)


def verified(pub: bytes, sig: bytes, nonce: bytes, body: bytes) -> bool:
    """Whether sig is pub's signature of body for the connection of nonce."""
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, _CONTEXT + nonce + body)
        return True
    except (InvalidSignature, ValueError):
        return False


class Routes:
    """Peer id -> (routing id, nonce) of the connection it asked to be
    answered on. Owned by the control plane's loop."""

    def __init__(self, cap: int = MAX_ROUTES):
        self.cap = cap
        self._routes: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()

    def learn(self, peer: str, routing_id: bytes, nonce: bytes) -> None:
        self._routes[peer] = (routing_id, nonce)
        self._routes.move_to_end(peer)
        while len(self._routes) > self.cap:
            self._routes.popitem(last=False)

    def seen(self, peer: str, routing_id: bytes) -> None:
        """peer spoke on routing_id: its answers go there from now on."""
        route = self._routes.get(peer)
        if route is not None and route[0] != routing_id:
            self._routes[peer] = (routing_id, route[1])

    def get(self, peer: str | None) -> tuple[bytes, bytes] | None:
        return None if peer is None else self._routes.get(peer)

    def __len__(self) -> int:
        return len(self._routes)


# Between two dial-back peers nobody can open a connection, so a control
# message goes through a member both reach (the daemon picks it): the sender
# signs it for its recipient with a time, the member passes it on over the
# recipient's dial-back route, and the recipient checks the sender's
# signature: the member can drop or delay it, not forge it, and can replay it
# for FORWARD_SKEW_S at most.
FORWARD = b"FWD1"
FORWARD_SKEW_S = 30.0
_FORWARD_CONTEXT = b"peerlearn-forward\0"
_HEAD = len(FORWARD) + 32 + 8 + SIG_BYTES  # magic, to, time, signature
FORWARD_OVERHEAD = _HEAD + 32  # and the origin's key, added by the member


def forward_payload(key: Ed25519PrivateKey, to: str, body: bytes,
                    now: float | None = None) -> bytes:
    """What a sender puts after its key to have a member pass body on to `to`."""
    to_b = to.encode("ascii").ljust(32, b"\0")[:32]
    ts = int(1000 * (time.time() if now is None else now)).to_bytes(8, "little")
    return FORWARD + to_b + ts + key.sign(_FORWARD_CONTEXT + to_b + ts + body) + body


def passed_on(origin_pub: bytes, payload: bytes) -> tuple[str, bytes]:
    """(to, what the member sends to it): the origin's key goes in front."""
    if len(payload) <= _HEAD or payload[:4] != FORWARD:
        raise ValueError("not a forward request")
    to = payload[4:36].rstrip(b"\0").decode("ascii", "replace")
    return to, FORWARD + origin_pub + payload[4:]


def received(me: str, inner: bytes, now: float | None = None) -> tuple[bytes, bytes]:
    """(origin's public key, body) of a message passed on to me; ValueError
    unless it is addressed to me, recent and signed by its origin."""
    if len(inner) <= FORWARD_OVERHEAD or inner[:4] != FORWARD:
        raise ValueError("not a forwarded message")
    pub, rest = inner[4:36], inner[36:]
    to_b, ts, sig, body = rest[:32], rest[32:40], rest[40:40 + SIG_BYTES], rest[40 + SIG_BYTES:]
    if to_b.rstrip(b"\0") != me.encode("ascii"):
        raise ValueError("forwarded message addressed to another peer")
    sent = int.from_bytes(ts, "little") / 1000
    if abs((time.time() if now is None else now) - sent) > FORWARD_SKEW_S:
        raise ValueError("forwarded message too old or from the future")
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, _FORWARD_CONTEXT + to_b + ts + body)
    except (InvalidSignature, ValueError):
        raise ValueError("forwarded message not signed by its origin") from None
    return pub, body
