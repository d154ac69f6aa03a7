"""A striped link: N connected, authenticated sockets to one peer, and the
ops that stripe one tensor over them (native/stream.cpp does the framing).

Ownership and failure:
  * The Link owns its sockets. Native ops borrow their descriptors for the
    duration of one transfer and never close them.
  * A descriptor is never closed while an op borrows it: close() during a
    transfer shuts the sockets down (the op fails at once, at both ends) and
    the last op to return closes them. Otherwise the number could be reused
    by a new socket and the op would read a stranger's bytes as its own.
  * A transfer that fails, times out or is cancelled shuts the sockets down
    (so the other end fails at once) and marks the link broken; open a new one.
    Nothing of an aborted transfer can be read as part of a later one.
  * One send and one receive may run on a link at the same time (one in each
    direction); two sends at once would interleave frames and are refused.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import torch

from peerlearn import _native
from peerlearn.transport.traffic import WIRE

StreamError = _native.StreamError
StreamTimeout = _native.StreamTimeout
StreamCancelled = _native.StreamCancelled
StreamProtocolError = _native.StreamProtocolError
StreamInputError = _native.StreamInputError  # our own tensor could not be encoded

DEFAULT_CHUNK_ELEMS = 1 << 18
_STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)


@dataclass(frozen=True)
class TransferStats:
    """What one finished transfer cost."""

    bytes_on_wire: int  # frame headers and payloads, this side's direction
    conn_chunks: list[int]  # DATA frames per connection: the striping
    seconds: float


def _run(op, started: float) -> TransferStats:
    op.wait()
    return TransferStats(op.bytes_on_wire, op.conn_chunks, time.monotonic() - started)


def _check_tensor(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        raise TypeError("links carry CPU tensors")
    if t.dtype not in _STREAM_DTYPES:
        raise TypeError(f"links carry float32, bfloat16, float16 or uint8 tensors, not {t.dtype}")
    if not t.is_contiguous():
        raise ValueError("links need contiguous tensors (no hidden copy is made)")
    return t.reshape(-1)


class Link:
    """N connected, authenticated sockets to one peer. See the module docstring.

    `binding` is a value both ends of this link computed from its handshakes
    and that neither end chose alone (it covers the acceptor's fresh nonces):
    a signature over it is good for this link only (swarm.datalinks uses it
    to bind a greeting's name to an identity).
    """

    def __init__(self, socks: list[socket.socket], link_id: bytes, *, binding: bytes = b"",
                 _root: Link | None = None):
        self._socks = socks
        self.link_id = link_id
        self.binding = binding
        self._fds = [s.fileno() for s in socks]
        if _root is None:
            for s in socks:
                # A transfer ends with a small END frame after its data: with
                # Nagle's algorithm it waited for the data's ACK, about 1.2
                # round trips a round on the emulated 100 ms path (peerlearn
                # bench wanround --nodelay, docs/benchmarks.md).
                try:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # not TCP (a socketpair in a test)
        # Lanes share their root's lock and user count: the root's sockets
        # stay open until no op on any lane borrows them.
        self._root = _root or self
        self._lock = self._root._lock if _root else threading.Lock()
        self._busy: set[str] = set()  # "send" and/or "receive" in flight
        self._users = 0  # ops borrowing the descriptors (root only)
        self._close_requested = False  # root only
        self._socks_closed = False  # root only
        self.broken = False
        self.closed = False
        self.traffic = "other"  # what WIRE counts this link's bytes under (set by its owner)

    def lanes(self, n: int) -> list[Link]:
        """n views of this link over disjoint, contiguous groups of its connections.

        Both ends number connections alike, so lane i here is lane i there.
        Lanes transfer independently (a slow connection holds up only its own
        lane's transfer); aborting a lane shuts only its sockets down; closing
        one does nothing, the parent owns the sockets (and closes them only
        once no lane's op borrows them). The caller must not use the parent
        while its lanes are in use.
        """
        if not 1 <= n <= self.n_conns:
            raise ValueError(f"need 1 <= lanes <= {self.n_conns} connections")
        cut = [self.n_conns * i // n for i in range(n + 1)]
        return [Link(self._socks[cut[i]:cut[i + 1]], self.link_id, binding=self.binding,
                     _root=self._root)
                for i in range(n)]

    @property
    def n_conns(self) -> int:
        return len(self._socks)

    @property
    def in_use(self) -> bool:
        """Whether an op borrows the link's sockets now (this link or a lane of it)."""
        with self._lock:
            return self._root._users > 0

    def remote_host(self) -> str | None:
        """The far end's address (of the first connection), or None once closed."""
        try:
            host = self._socks[0].getpeername()[0]
        except (OSError, IndexError):
            return None
        return host if isinstance(host, str) else None

    def _claim(self, direction: str) -> None:
        with self._lock:
            if self.closed or self._root.closed:
                raise StreamError("link is closed")
            if self.broken:
                raise StreamError("link is broken by an earlier failed transfer; open a new one")
            if direction in self._busy:
                raise StreamError(f"a {direction} is already in flight on this link")
            self._busy.add(direction)
            self._root._users += 1

    def _release(self, direction: str, failed: bool) -> None:
        with self._lock:
            self._busy.discard(direction)
            self.broken = self.broken or failed
            self._root._users -= 1
            last = self._root._users == 0 and self._root._close_requested
        if last:
            self._root._close_sockets()

    def send(
        self,
        tensor: torch.Tensor,
        op_id: int,
        *,
        codec: int | None = None,
        block_size: int = 64,
        stochastic: bool = False,
        seed: int = 0,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        timeout: float = 0.0,
    ) -> TransferStats:
        """Sends tensor striped over all connections.

        codec None sends raw elements straight from the tensor's memory; a
        codec id (peerlearn.wire.codecs.Codec) encodes each chunk as it goes.
        The tensor must not be written to until this returns.
        """
        flat = _check_tensor(tensor)
        self._claim("send")
        failed, op = True, None
        try:
            started = time.monotonic()
            op = _native.start_send(
                self._fds, flat, op_id, chunk_elems,
                -1 if codec is None else int(codec), block_size if codec is not None else 0,
                stochastic, seed, timeout,
            )
            stats = _run(op, started)
            failed = False
            return stats
        finally:
            if op is not None:  # a failed transfer's bytes went out too
                WIRE.add("sent", self._root.traffic, op.bytes_on_wire,
                         None if codec is None else int(codec))
            self._release("send", failed)

    def recv_into(
        self, out: torch.Tensor, op_id: int, *, accumulate: bool = False, timeout: float = 0.0
    ) -> TransferStats:
        """Receives op op_id into out (in place); with accumulate, out += incoming (fp32 out).

        On any failure out holds an unspecified mix of old and new values and
        the link is broken; the caller must treat out as garbage.
        """
        flat = _check_tensor(out)
        self._claim("receive")
        failed, op = True, None
        try:
            started = time.monotonic()
            op = _native.start_recv(self._fds, flat, op_id, accumulate, timeout)
            stats = _run(op, started)
            failed = False
            return stats
        finally:
            if op is not None:  # what a failed transfer read had crossed the wire too
                codec = op.wire_codec
                WIRE.add("received", self._root.traffic, op.bytes_on_wire,
                         None if codec < 0 else codec)
            self._release("receive", failed)

    def healthy(self) -> bool:
        """False if the link is broken, closed, or the other end has closed any socket.

        Cheap (a non-blocking peek per socket: no select(), which fails for
        descriptors past FD_SETSIZE); a link that passes can still fail at the
        next transfer, which then raises as usual.
        """
        if self.broken or self.closed:
            return False
        for s in self._socks:
            try:
                if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return False
            except BlockingIOError:
                pass  # nothing to read: open and idle
            except OSError:
                return False
        return True

    def abort(self) -> None:
        """Fails any transfer in flight on either end at once; the link is broken after.

        Safe from any thread: it shuts the sockets down (never closes them, so
        descriptors a native op borrows stay valid until the op ends).
        """
        with self._lock:
            self.broken = True
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Closes the link; safe from any thread, even during a transfer.

        A lane only marks itself closed. On the root, with no op in flight
        the sockets close now; otherwise they are shut down (the op fails at
        once) and the op closes them as it returns.
        """
        with self._lock:
            self.closed = True
            if self._root is not self:
                return
            self._close_requested = True
            in_use = self._users > 0
        if in_use:
            self.abort()
        else:
            self._close_sockets()

    def _close_sockets(self) -> None:
        with self._lock:
            if self._socks_closed:
                return
            self._socks_closed = True
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


