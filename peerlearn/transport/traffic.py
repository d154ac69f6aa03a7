"""Bytes this process moved, by direction and traffic class: what metrics and
training reports show as bytes on the wire, counted by the transports as the
bytes leave and reach our code, never estimated.

Traffic classes: the data links' (peerlearn.swarm.datalinks.traffic_of:
"round", "state", "gossip"; "other" for a link no owner classed, which is
where every link's greeting is counted) and CONTROL, the control plane's
messages (peerlearn.transport.control).

What each counts, and what neither sees:
  * a data link counts its frames, headers and payloads, including the part
    of a transfer that failed; not the handshake that opens each of a link's
    connections (162 bytes: 90 from the dialler, 72 back) nor TCP/IP headers.
  * the control plane counts each message's frame as our code hands it to zmq
    or takes it from zmq (the sender's key and the message); not zmq's own
    framing, its heartbeats, the CURVE handshake or the CURVE box around each
    message, nor TCP/IP headers. docs/operations.md gives the measured
    overhead on top.

A light module (no torch, no native code) so that the control plane, which
`peerlearn status` also runs, can count here.
"""

from __future__ import annotations

import threading

CONTROL = "control"


class WireBytes:
    """Thread-safe counters: any transport thread adds, any reader snapshots."""

    def __init__(self):
        self._lock = threading.Lock()
        # By (direction, traffic, codec id; None: raw): the sender names its
        # codec, a receiver the one its frames' headers named.
        self._bytes: dict[tuple[str, str, int | None], int] = {}

    def add(self, direction: str, traffic: str, n: int, codec: int | None = None) -> None:
        with self._lock:
            key = (direction, traffic, codec)
            self._bytes[key] = self._bytes.get(key, 0) + n

    def snapshot(self) -> dict[tuple[str, str], int]:
        """Bytes by (direction, traffic), every codec together."""
        out: dict[tuple[str, str], int] = {}
        for (direction, traffic, _), n in self.by_codec().items():
            out[direction, traffic] = out.get((direction, traffic), 0) + n
        return out

    def by_codec(self) -> dict[tuple[str, str, int | None], int]:
        with self._lock:
            return dict(self._bytes)


WIRE = WireBytes()
