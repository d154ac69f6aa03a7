"""The root of every exception peerlearn raises on purpose.

`except peerlearn.PeerlearnError` catches any failure the library reports
(a peer that could not start or join, a bad message, a corrupt checkpoint,
a weak secret, ...); each layer's own classes derive from it and from the
builtin they behave like (ValueError, TimeoutError). A leaf module: every
layer may import it, it imports nothing.
"""

from __future__ import annotations


class PeerlearnError(Exception):
    """Base of every failure peerlearn raises on purpose."""
