"""Data-plane links keyed by peer id, for the daemon.

Each peer keeps at most one outgoing link per (peer, channel) it sends to (it
connected) and one incoming link per (peer, channel) it receives from (it
accepted). A link carries one operation at a time, so operations that may be
in flight together use different channels (an all-reduce round, gossip,
state transfer: see the CHANNEL_* constants). The connecting side names
itself and the channel in a 64-byte greeting, the first op on a new link, so
the acceptor can file the link under the right key; the link itself is
authenticated by the data-plane secret. Greetings are read on short-lived
threads bounded by a 5 s timeout.

Broken links are replaced, never repaired: `outgoing` reconnects when the
cached link is unhealthy, and a new link from a peer replaces (and closes) the
one it had before. Threads: one accept thread (owned, joined by close()).
"""

from __future__ import annotations

import threading
import time

import torch

from peerlearn.transport.stream import (
    Link,
    LinkListener,
    StreamError,
    StreamProtocolError,
    connect_link,
)

GREETING_OP = (1 << 64) - 1
GREETING_BYTES = 64  # peer id (ASCII, NUL padded) in [0, 56), channel u64 LE in [56, 64)
ID_BYTES = 56
MAX_CHANNEL = 1 << 16

CHANNEL_ROUND = 0  # the all-reduce of a round
CHANNEL_STATE = 1 << 12  # state transfer to a syncing peer
CHANNEL_GOSSIP = 1 << 13  # gossip exchanges, outside rounds


def send_greeting(link: Link, name: str, channel: int, timeout: float) -> None:
    """The first op on a new link: who connected (printable ASCII, at most 56
    bytes) and for which channel. Raises StreamError; the caller closes the link."""
    raw = name.encode("ascii")
    if not raw or len(raw) > ID_BYTES or not name.isprintable():
        raise ValueError(f"greeting name {name!r} is not 1..{ID_BYTES} printable ASCII bytes")
    if not 0 <= channel < MAX_CHANNEL:
        raise ValueError(f"channel {channel} out of range")
    greet = raw.ljust(ID_BYTES, b"\0") + channel.to_bytes(8, "little")
    link.send(torch.frombuffer(bytearray(greet), dtype=torch.uint8), GREETING_OP, timeout=timeout)


def read_greeting(link: Link, timeout: float) -> tuple[str, int]:
    """(name, channel) from a new link's greeting. Raises StreamError, or
    ValueError for a malformed one."""
    greet = torch.zeros(GREETING_BYTES, dtype=torch.uint8)
    link.recv_into(greet, GREETING_OP, timeout=timeout)
    raw = bytes(greet.numpy())
    try:
        name = raw[:ID_BYTES].rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("greeting name is not ASCII") from None
    channel = int.from_bytes(raw[ID_BYTES:], "little")
    if not name or not name.isprintable() or channel >= MAX_CHANNEL:
        raise ValueError("bad greeting")
    return name, channel


class PeerLinks:
    def __init__(self, my_id: str, host: str, port: int, secret: bytes, n_conns: int = 4):
        self.my_id = my_id
        self.secret = secret
        self.n_conns = n_conns
        self.listener = LinkListener(host, port, secret)
        self.port = self.listener.address[1]
        self._out: dict[tuple[str, int], Link] = {}
        self._in: dict[tuple[str, int], Link] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.bad_greetings = 0
        self._thread = threading.Thread(target=self._accept_loop, name="peer-links", daemon=True)
        self._thread.start()

    def set_secret(self, secret: bytes) -> None:
        """Links opened or accepted from now on authenticate with this secret."""
        self.listener.set_secret(secret)
        self.secret = secret

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                link = self.listener.accept_link(timeout=0.2)
            except TimeoutError:
                continue
            except StreamError:
                return
            # Each greeting on its own short-lived thread (bounded by its
            # timeout), so a silent or slow link cannot hold up the others.
            threading.Thread(target=self._greet, args=(link,), daemon=True).start()

    def _greet(self, link: Link) -> None:
        try:
            peer, channel = read_greeting(link, timeout=5)
        except (StreamError, ValueError):
            with self._cv:
                self.bad_greetings += 1
            link.close()
            return
        with self._cv:
            if self._closed:
                old = link  # too late: close it rather than file it
            else:
                old = self._in.pop((peer, channel), None)
                self._in[(peer, channel)] = link
                self._cv.notify_all()
        if old is not None:
            old.close()

    def outgoing(self, peer: str, address: str, timeout: float = 10.0,
                 channel: int = CHANNEL_ROUND) -> Link:
        """A healthy link to peer at host:port on channel, connecting (and greeting) if needed."""
        if not 0 <= channel < MAX_CHANNEL:
            raise ValueError(f"channel {channel} out of range")
        with self._cv:
            link = self._out.get((peer, channel))
        if link is not None and link.healthy():
            return link
        if link is not None:
            link.close()
        host, port = address.rsplit(":", 1)
        link = connect_link(host, int(port), self.secret, self.n_conns, timeout=timeout)
        try:
            send_greeting(link, self.my_id, channel, timeout)
        except StreamError:
            link.close()
            raise
        with self._cv:
            self._out[(peer, channel)] = link
        return link

    def incoming(self, peer: str, timeout: float = 10.0, channel: int = CHANNEL_ROUND) -> Link:
        """The healthy link from peer on channel, waiting up to timeout for it to connect."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                link = self._in.get((peer, channel))
                if link is not None and link.healthy():
                    return link
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no healthy link from {peer}")
                self._cv.wait(min(left, 0.1))

    def recv_into(self, peer: str, out: torch.Tensor, op_id: int, *, channel: int,
                  timeout: float) -> None:
        """Receives op_id from peer on channel into out (Link.recv_into semantics).

        A link whose sender failed an earlier op after sending it still looks
        healthy here (its frames are pending, so no EOF shows) until reading
        meets those stale frames and breaks it; the sender has meanwhile
        connected afresh, so the receive moves to that link. Raises what
        Link.recv_into raises, or TimeoutError, at the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.1, deadline - time.monotonic())
            link = self.incoming(peer, timeout=left, channel=channel)
            try:
                link.recv_into(out, op_id, timeout=left)
                return
            except StreamProtocolError:
                if time.monotonic() >= deadline:
                    raise

    def abort(self, peer: str, channel: int) -> None:
        """Fails whatever is in flight to or from peer on channel, at both ends."""
        with self._cv:
            links = [d.get((peer, channel)) for d in (self._out, self._in)]
        for link in links:
            if link is not None:
                link.abort()

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.listener.close()
        with self._cv:
            links = list(self._out.values()) + list(self._in.values())
            self._out.clear()
            self._in.clear()
        for link in links:
            link.close()
