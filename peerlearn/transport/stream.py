"""Striped tensor links: N authenticated TCP connections between two peers.

A long fat pipe is filled by several connections at once: one TCP connection
is limited to window / RTT, so a 100 ms path with the kernel's default buffers
caps it far below a gigabit. A `Link` stripes every transfer over all its
connections (the chunking, framing and reassembly live in native/stream.cpp);
this module opens and authenticates the sockets and owns them.

Ownership and failure:
  * The Link owns its sockets. Native ops borrow their descriptors for the
    duration of one transfer and never close them.
  * A transfer that fails, times out or is cancelled shuts the sockets down
    (so the other end fails at once) and marks the link broken; open a new one.
    Nothing of an aborted transfer can be read as part of a later one.
  * One send and one receive may run on a link at the same time (one in each
    direction); two sends at once would interleave frames and are refused.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from peerlearn import _native
from peerlearn.wire import handshake as hs

StreamError = _native.StreamError
StreamTimeout = _native.StreamTimeout
StreamCancelled = _native.StreamCancelled
StreamProtocolError = _native.StreamProtocolError
StreamInputError = _native.StreamInputError  # our own tensor could not be encoded

# Chosen from `peerlearn bench stream` (docs/benchmarks.md): on the emulated
# 100 ms / 1 Gbit/s path with default buffers, 8 connections fill the link.
DEFAULT_CONNS = 8
DEFAULT_CHUNK_ELEMS = 1 << 18
_STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)


@dataclass(frozen=True)
class SocketOptions:
    """Per-socket tuning; None keeps the machine's default.

    Buffer sizes are applied before connect()/listen() so TCP window scaling
    is negotiated for them.
    """

    sndbuf: int | None = None
    rcvbuf: int | None = None
    congestion: str | None = None  # e.g. "cubic", "bbr"; must be available in the kernel

    def apply(self, sock: socket.socket) -> None:
        if self.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        if self.congestion is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion.encode())


@dataclass(frozen=True)
class TransferStats:
    """What one finished transfer cost."""

    bytes_on_wire: int  # frame headers and payloads, this side's direction
    conn_chunks: list[int]  # DATA frames per connection: the striping
    seconds: float


def _run(op, started: float) -> TransferStats:
    op.wait()
    return TransferStats(op.bytes_on_wire, op.conn_chunks, time.monotonic() - started)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise hs.HandshakeError("connection closed during the handshake")
        buf += part
    return bytes(buf)


def _check_tensor(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        raise TypeError("links carry CPU tensors")
    if t.dtype not in _STREAM_DTYPES:
        raise TypeError(f"links carry float32, bfloat16, float16 or uint8 tensors, not {t.dtype}")
    if not t.is_contiguous():
        raise ValueError("links need contiguous tensors (no hidden copy is made)")
    return t.reshape(-1)


class Link:
    """N connected, authenticated sockets to one peer. See the module docstring."""

    def __init__(self, socks: list[socket.socket], link_id: bytes, *, owns: bool = True):
        self._socks = socks
        self.link_id = link_id
        self._fds = [s.fileno() for s in socks]
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # "send" and/or "receive" in flight
        self._owns = owns  # False for a lane: close() leaves the sockets to the parent
        self.broken = False
        self.closed = False

    def lanes(self, n: int) -> list[Link]:
        """n views of this link over disjoint, contiguous groups of its connections.

        Both ends number connections alike, so lane i here is lane i there.
        Lanes transfer independently (a slow connection holds up only its own
        lane's transfer); aborting a lane shuts only its sockets down; closing
        one does nothing, the parent owns the sockets. The caller must not use
        the parent while its lanes are in use.
        """
        if not 1 <= n <= self.n_conns:
            raise ValueError(f"need 1 <= lanes <= {self.n_conns} connections")
        cut = [self.n_conns * i // n for i in range(n + 1)]
        return [Link(self._socks[cut[i]:cut[i + 1]], self.link_id, owns=False)
                for i in range(n)]

    @property
    def n_conns(self) -> int:
        return len(self._socks)

    def _claim(self, direction: str) -> None:
        with self._lock:
            if self.closed:
                raise StreamError("link is closed")
            if self.broken:
                raise StreamError("link is broken by an earlier failed transfer; open a new one")
            if direction in self._busy:
                raise StreamError(f"a {direction} is already in flight on this link")
            self._busy.add(direction)

    def _release(self, direction: str, failed: bool) -> None:
        with self._lock:
            self._busy.discard(direction)
            self.broken = self.broken or failed

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
        failed = True
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
        failed = True
        try:
            started = time.monotonic()
            op = _native.start_recv(self._fds, flat, op_id, accumulate, timeout)
            stats = _run(op, started)
            failed = False
            return stats
        finally:
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
        with self._lock:
            self.closed = True
        if not self._owns:
            return
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect_link(
    host: str,
    port: int,
    secret: bytes,
    n_conns: int = DEFAULT_CONNS,
    *,
    options: SocketOptions = SocketOptions(),
    timeout: float = 30.0,
) -> Link:
    """Opens n_conns connections in parallel and authenticates each.

    Raises HandshakeError if the server cannot prove the secret or refuses
    us, OSError on network failure; no socket is left open on failure.
    """
    link_id = secrets.token_bytes(16)

    def open_one(idx: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            options.apply(sock)
            sock.settimeout(timeout)
            sock.connect((host, port))
            client = hs.ClientHandshake(secret, link_id, idx, n_conns)
            sock.sendall(client.hello())
            sock.sendall(client.on_challenge(_recv_exact(sock, hs.CHALLENGE_BYTES)))
            client.on_accept(_recv_exact(sock, hs.ACCEPT_BYTES))
            sock.settimeout(None)
            return sock
        except BaseException:
            sock.close()
            raise

    socks: list[socket.socket] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=min(n_conns, 32)) as pool:
        for fut in [pool.submit(open_one, i) for i in range(n_conns)]:
            try:
                socks.append(fut.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below after cleanup
                errors.append(e)
    if errors:
        for s in socks:
            s.close()
        raise errors[0]
    return Link(socks, link_id)


@dataclass
class _PendingLink:
    n_conns: int
    first_seen: float
    socks: dict[int, socket.socket] = field(default_factory=dict)


class LinkListener:
    """Accepts striped links. Unauthenticated or malformed connections are
    closed and counted in `rejected`; they never reach `accept_link`.

    A background thread accepts; each handshake runs on its own short-lived
    thread with a deadline, so a slow or silent stranger cannot block others.
    close() stops the thread and closes every socket not yet handed out.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        *,
        options: SocketOptions = SocketOptions(),
        handshake_timeout: float = 10.0,
        max_pending: int = 1024,
    ):
        hs._check_secret(secret)
        self._secret = bytes(secret)
        self._options = options
        self._timeout = handshake_timeout
        self._max_pending = max_pending
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        options.apply(self._sock)  # accepted sockets inherit the buffer sizes
        self._sock.bind((host, port))
        self._sock.listen(256)
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()[:2]
        self.rejected = 0
        self.rejected_reasons: list[str] = []
        self._cv = threading.Condition()
        self._pending: dict[bytes, _PendingLink] = {}
        self._ready: list[Link] = []
        self._handshakes = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="link-accept", daemon=True)
        self._thread.start()

    def set_secret(self, secret: bytes) -> None:
        """Handshakes from now on check this secret (ones in progress keep theirs)."""
        hs._check_secret(secret)
        self._secret = bytes(secret)

    def _reject(self, sock: socket.socket, why: str) -> None:
        sock.close()
        with self._cv:
            self.rejected += 1
            self.rejected_reasons = (self.rejected_reasons + [why])[-32:]

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                self._expire_pending()
                continue
            except OSError:
                return
            with self._cv:
                busy = self._handshakes >= self._max_pending
                if not busy:
                    self._handshakes += 1
            if busy:
                self._reject(sock, "too many handshakes in progress")
                continue
            threading.Thread(target=self._handshake, args=(sock,), daemon=True).start()

    def _handshake(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(self._timeout)
            server = hs.ServerHandshake(self._secret)
            sock.sendall(server.on_hello(_recv_exact(sock, hs.HELLO_BYTES)))
            info, accept = server.on_proof(_recv_exact(sock, hs.PROOF_BYTES))
            self._admit(sock, info, accept)
        except (hs.HandshakeError, OSError) as e:
            self._reject(sock, f"{type(e).__name__}: {e}")
        finally:
            with self._cv:
                self._handshakes -= 1

    def _admit(self, sock: socket.socket, info: hs.LinkHello, accept: bytes) -> None:
        with self._cv:
            if self._closed:
                raise hs.HandshakeError("listener closed")
            p = self._pending.setdefault(info.link_id, _PendingLink(info.n_conns, time.monotonic()))
            if p.n_conns != info.n_conns or info.conn_index in p.socks:
                raise hs.HandshakeError("connection disagrees with its link's other connections")
            # ACCEPT is sent before the socket joins the link, under the lock,
            # so the client's first frame cannot race a socket we still own here.
            sock.sendall(accept)
            sock.settimeout(None)
            p.socks[info.conn_index] = sock
            if len(p.socks) == p.n_conns:
                del self._pending[info.link_id]
                self._ready.append(Link([p.socks[i] for i in range(p.n_conns)], info.link_id))
                self._cv.notify_all()

    def _expire_pending(self) -> None:
        now = time.monotonic()
        with self._cv:
            stale = [k for k, p in self._pending.items() if now - p.first_seen > 3 * self._timeout]
            for k in stale:
                for s in self._pending.pop(k).socks.values():
                    s.close()
                self.rejected += 1
                self.rejected_reasons = (self.rejected_reasons + ["incomplete link expired"])[-32:]

    def accept_link(self, timeout: float | None = None) -> Link:
        """Returns the next fully connected link; TimeoutError after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._ready:
                if self._closed:
                    raise StreamError("listener closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no link arrived in time")
                self._cv.wait(left if left is not None else 0.5)
            return self._ready.pop(0)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            leftovers = [s for p in self._pending.values() for s in p.socks.values()]
            leftovers += [s for link in self._ready for s in link._socks]
            self._pending.clear()
            self._ready.clear()
            self._cv.notify_all()
        self._sock.close()
        self._thread.join(timeout=2)
        for s in leftovers:
            s.close()

    def __enter__(self) -> LinkListener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
