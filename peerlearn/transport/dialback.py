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
