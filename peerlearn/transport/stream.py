"""Striped tensor links: N authenticated TCP connections between two peers.

A long fat pipe is filled by several connections at once: one TCP connection
is limited to window / RTT, so a 100 ms path with the kernel's default buffers
caps it far below a gigabit. A `Link` (transport.link) stripes every transfer
over all its connections (the chunking, framing and reassembly live in
native/stream.cpp); this module opens and authenticates the sockets.

Every handshake, at either end, runs against one deadline for the whole
exchange (not a timeout per read), so a peer dribbling a byte at a time holds
a handshake slot for at most that long.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from peerlearn.transport.admission import FairAdmission, raise_fd_limit
from peerlearn.transport.link import (  # noqa: F401 - re-exported: callers import them from here
    DEFAULT_CHUNK_ELEMS,
    Link,
    StreamCancelled,
    StreamError,
    StreamInputError,
    StreamProtocolError,
    StreamTimeout,
    TransferStats,
)
from peerlearn.wire import handshake as hs

# Chosen from `peerlearn bench stream` (docs/benchmarks.md): on the emulated
# 100 ms / 1 Gbit/s path with default buffers, 8 connections fill the link.
DEFAULT_CONNS = 8
LISTEN_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn



class _Refused(hs.HandshakeError):
    """Over an admission bound (counted in LinkListener.refused)."""


class _Deadline(hs.HandshakeError):
    """The handshake's deadline passed (counted in LinkListener.deadlines)."""


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


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        _arm(sock, deadline)
        try:
            part = sock.recv(n - len(buf))
        except TimeoutError:
            raise _Deadline("handshake deadline passed") from None
        if not part:
            raise hs.HandshakeError("connection closed during the handshake")
        buf += part
    return bytes(buf)


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    _arm(sock, deadline)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise _Deadline("handshake deadline passed") from None


def _arm(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Deadline("handshake deadline passed")
    sock.settimeout(left)


def _transcript(hello: bytes, challenge: bytes) -> bytes:
    return hashlib.sha256(hello + challenge).digest()


def _binding(transcripts: list[bytes]) -> bytes:
    """Link.binding: both ends hash the same HELLO and CHALLENGE bytes of every
    connection in index order; the CHALLENGE carries the acceptor's fresh nonce."""
    return hashlib.sha256(b"peerlearn-link-binding\0" + b"".join(transcripts)).digest()


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
    deadline = time.monotonic() + timeout

    def open_one(idx: int) -> tuple[socket.socket, bytes]:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            options.apply(sock)
            _arm(sock, deadline)
            sock.connect((host, port))
            client = hs.ClientHandshake(secret, link_id, idx, n_conns)
            _send_all(sock, client.hello(), deadline)
            challenge = _recv_exact(sock, hs.CHALLENGE_BYTES, deadline)
            _send_all(sock, client.on_challenge(challenge), deadline)
            client.on_accept(_recv_exact(sock, hs.ACCEPT_BYTES, deadline))
            sock.settimeout(None)
            return sock, _transcript(client.hello(), challenge)
        except BaseException:
            sock.close()
            raise

    opened: list[tuple[socket.socket, bytes]] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=min(n_conns, 32)) as pool:
        for fut in [pool.submit(open_one, i) for i in range(n_conns)]:
            try:
                opened.append(fut.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below after cleanup
                errors.append(e)
    if errors:
        for s, _ in opened:
            s.close()
        raise errors[0]
    return Link([s for s, _ in opened], link_id, binding=_binding([t for _, t in opened]))


@dataclass
class _PendingLink:
    n_conns: int
    first_seen: float
    socks: dict[int, socket.socket] = field(default_factory=dict)
    transcripts: dict[int, bytes] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # one pending slot held per socket


def _cut(sock: socket.socket) -> None:
    """Ends a handshake another thread runs on sock: its next read fails at
    once (shutdown, never close: the descriptor stays that thread's to close)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class LinkListener:
    """Accepts striped links. Unauthenticated or malformed connections are
    closed and counted in `rejected`; they never reach `accept_link`.

    A background thread accepts; each handshake runs on its own short-lived
    thread under one deadline (handshake_timeout) for the whole exchange.
    What a sender can make the listener hold is bounded, per source address,
    per address prefix (an IPv4 /24, an IPv6 /64) and in total: handshakes in
    progress (max_per_source, max_per_prefix, max_pending), and sockets of
    authenticated links still waiting for their other connections
    (max_pending_socks_per_source, max_pending_socks_per_prefix,
    max_pending_socks). A connection past a source or prefix bound is closed
    at once and counted in `refused` (and in `rejected`). When a total is
    full, a connection from a prefix holding fewer slots than the busiest one
    takes the oldest slot of that prefix (admission.FairAdmission): the
    holder is cut off and counted in `evicted` (and in `refused`), so
    strangers parked on every slot from a few prefixes cannot keep a member
    out.
    accept() failing (EMFILE, ENFILE, ...) is counted in `accept_errors` and
    retried after a short back-off: the loop ends only at close().
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
        max_per_source: int = 64,
        max_per_prefix: int = 256,
        max_pending_socks: int = 4096,
        max_pending_socks_per_source: int = 1024,
        max_pending_socks_per_prefix: int = 2048,
    ):
        hs._check_secret(secret)
        raise_fd_limit()
        self._secret = bytes(secret)
        self._options = options
        self._timeout = handshake_timeout
        self._handshakes = FairAdmission(max_per_source, max_pending, max_per_prefix)
        self._pending_socks = FairAdmission(max_pending_socks_per_source, max_pending_socks,
                                            max_pending_socks_per_prefix)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        options.apply(self._sock)  # accepted sockets inherit the buffer sizes
        self._sock.bind((host, port))
        # A deep accept queue: a flood that overflows it has the kernel drop
        # everyone's SYNs and ACKs alike (a member's connection then waits out
        # TCP's retransmission back-off), before any admission bound applies.
        self._sock.listen(LISTEN_BACKLOG)
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()[:2]
        self.rejected = 0
        self.refused = 0  # subset of rejected: over an admission bound (evictions included)
        self.evicted = 0  # handshakes and incomplete links cut off for a newcomer
        self.deadlines = 0  # subset of rejected: handshake deadline passed
        self.accept_errors = 0
        self.rejected_reasons: list[str] = []
        self._cv = threading.Condition()
        self._pending: dict[bytes, _PendingLink] = {}
        self._ready: list[Link] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="link-accept", daemon=True)
        self._thread.start()

    def set_secret(self, secret: bytes) -> None:
        """Handshakes from now on check this secret (ones in progress keep theirs)."""
        hs._check_secret(secret)
        self._secret = bytes(secret)

    def _count(self, why: str, *, refused: bool = False, deadline: bool = False) -> None:
        with self._cv:
            self.rejected += 1
            self.refused += refused
            self.deadlines += deadline
            self.rejected_reasons = (self.rejected_reasons + [why])[-32:]

    def _reject(self, sock: socket.socket, why: str, **kinds: bool) -> None:
        sock.close()
        self._count(why, **kinds)

    def _accept_loop(self) -> None:
        backoff = 0.0
        last_expiry = time.monotonic()
        while not self._closed:
            if time.monotonic() - last_expiry > 0.5:
                last_expiry = time.monotonic()
                self._expire_pending()
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed:
                    return  # close() closed our socket
                # EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: all say "not now".
                with self._cv:
                    self.accept_errors += 1
                # Out of descriptors: connections already held must finish or
                # expire first; spinning on accept() would only burn a core.
                backoff = min(1.0, max(0.02, backoff * 2))
                time.sleep(backoff)
                continue
            backoff = 0.0
            source = addr[0]
            token, why, victims = self._handshakes.acquire(source, lambda s=sock: _cut(s))
            if why is not None:
                self._reject(sock, why, refused=True)
                continue
            self._evict(victims, "handshake taken by a newcomer")
            try:
                threading.Thread(target=self._handshake, args=(sock, source, token),
                                 daemon=True).start()
            except RuntimeError:  # can't start new thread: refuse, keep accepting
                self._handshakes.release(token)
                self._reject(sock, "no thread for the handshake", refused=True)

    def _evict(self, victims, why: str) -> None:
        """Runs FairAdmission's evictions (outside every lock) and counts them."""
        for cut in victims:
            cut()
        if victims:
            with self._cv:
                self.evicted += len(victims)
                self.refused += len(victims)
                self.rejected_reasons = (self.rejected_reasons + [why])[-32:]

    def _handshake(self, sock: socket.socket, source: str, token: int) -> None:
        deadline = time.monotonic() + self._timeout
        try:
            server = hs.ServerHandshake(self._secret)
            hello = _recv_exact(sock, hs.HELLO_BYTES, deadline)
            challenge = server.on_hello(hello)
            _send_all(sock, challenge, deadline)
            info, accept = server.on_proof(_recv_exact(sock, hs.PROOF_BYTES, deadline))
            victims: list = []
            try:
                self._admit(sock, source, info, accept, _transcript(hello, challenge), victims)
            finally:
                self._evict(victims, "incomplete link cut off for a newcomer")
        except (hs.HandshakeError, OSError) as e:
            self._reject(sock, f"{type(e).__name__}: {e}",
                         deadline=isinstance(e, _Deadline), refused=isinstance(e, _Refused))
        finally:
            self._handshakes.release(token)

    def _admit(self, sock: socket.socket, source: str, info: hs.LinkHello, accept: bytes,
               transcript: bytes, victims: list) -> None:
        """Files an authenticated socket under its link; the evictions this
        needs go to `victims`, for the caller to run once _cv is released."""
        with self._cv:
            if self._closed:
                raise hs.HandshakeError("listener closed")
            p = self._pending.get(info.link_id)
            if p is not None and (p.n_conns != info.n_conns or info.conn_index in p.socks):
                raise hs.HandshakeError("connection disagrees with its link's other connections")
            token, why, cut = self._pending_socks.acquire(
                source, lambda link_id=info.link_id: self._drop_pending(link_id))
            victims += cut
            if why is not None:
                raise _Refused(f"{why} (sockets of incomplete links)")
            if p is None:
                p = self._pending[info.link_id] = _PendingLink(info.n_conns, time.monotonic())
            # ACCEPT is sent before the socket joins the link, under the lock,
            # so the client's first frame cannot race a socket we still own here.
            try:
                sock.sendall(accept)
            except OSError:
                self._pending_socks.release(token)
                if not p.socks:
                    del self._pending[info.link_id]
                raise
            sock.settimeout(None)
            p.socks[info.conn_index] = sock
            p.transcripts[info.conn_index] = transcript
            p.tokens.append(token)
            if len(p.socks) == p.n_conns:
                del self._pending[info.link_id]
                self._release_pending(p)
                order = range(p.n_conns)
                self._ready.append(Link([p.socks[i] for i in order], info.link_id,
                                        binding=_binding([p.transcripts[i] for i in order])))
                self._cv.notify_all()

    def _release_pending(self, p: _PendingLink) -> None:
        for token in p.tokens:
            self._pending_socks.release(token)
        p.tokens.clear()

    def _drop_pending(self, link_id: bytes) -> None:
        """An incomplete link loses its sockets (one of its slots went to a newcomer)."""
        with self._cv:
            p = self._pending.pop(link_id, None)
            if p is not None:
                self._release_pending(p)
        if p is not None:
            for s in p.socks.values():
                s.close()

    def _expire_pending(self) -> None:
        now = time.monotonic()
        with self._cv:
            stale = [k for k, p in self._pending.items() if now - p.first_seen > 3 * self._timeout]
            for k in stale:
                p = self._pending.pop(k)
                self._release_pending(p)
                for s in p.socks.values():
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
            for p in self._pending.values():
                self._release_pending(p)
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
