"""A relay for links between two peers neither of which can be dialled.

Two peers behind NATs (`dial-back`) cannot open a TCP connection to each
other. Each opens its link's connections to a relay instead (a reachable
member that runs one), asking on each for the other peer; the relay pairs
connection i of one with connection i of the other and copies bytes both
ways. Over the spliced connections the two run the ordinary link handshake
(the smaller id as client) and greeting, end to end: the relay sees only
what any on-path member sees, and cannot complete a link in either peer's
name without its identity key.

Request, 136 bytes, client -> relay:

    "PLR1" | from id [32, ASCII] | to id [32] | channel u64 LE
    | conn_index u16 LE | n_conns u16 LE | unix time u64 LE | nonce [16]
    | HMAC-SHA256(relay key, everything before) [32]

The relay key is derived from the data key, so only swarm members can use
a relay. The relay answers "PLRK" once the connection is spliced. What a
client can make a relay hold is bounded: requests waiting for their other
half (MAX_WAITING in all, MAX_WAITING_PER_PEER per asking id, each for at
most WAIT_S), and spliced connections (MAX_SPLICED in all, MAX_SPLICED_PER_PEER
per id); a request past a bound is refused (closed, counted). A request is
accepted within CLOCK_SKEW_S of the relay's clock; a replayed one can only
splice its sender to a peer that will then fail the link handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time
from collections import Counter

from peerlearn.transport.admission import FairAdmission
from peerlearn.transport.link import Link
from peerlearn.wire import handshake as hs

MAGIC, OK = b"PLR1", b"PLRK"
REQUEST_BYTES = 136
ID_BYTES = 32
CLOCK_SKEW_S = 120.0
WAIT_S = 10.0
REQUEST_TIMEOUT_S = 5.0
MAX_WAITING, MAX_WAITING_PER_PEER = 1024, 64
MAX_SPLICED, MAX_SPLICED_PER_PEER = 256, 64
_COPY_BYTES = 1 << 18


class RelayRefused(OSError):
    """The relay closed a request (over a bound, or the other half never came)."""


class RelayUnreachable(OSError):
    """No connection to the relay could be opened (it is gone): try another."""


def relay_key(data_key: bytes) -> bytes:
    return hmac.new(data_key, b"peerlearn relay v1", hashlib.sha256).digest()


def request(key: bytes, me: str, to: str, channel: int, index: int, n: int,
            now: float | None = None) -> bytes:
    """One connection's request (module docstring)."""
    head = (MAGIC + me.encode("ascii").ljust(ID_BYTES, b"\0")[:ID_BYTES]
            + to.encode("ascii").ljust(ID_BYTES, b"\0")[:ID_BYTES]
            + channel.to_bytes(8, "little") + index.to_bytes(2, "little")
            + n.to_bytes(2, "little") + int(time.time() if now is None else now)
            .to_bytes(8, "little") + os.urandom(16))
    return head + hmac.new(key, head, hashlib.sha256).digest()


def parse_request(key: bytes, data: bytes, now: float | None = None
                  ) -> tuple[str, str, int, int, int]:
    """(from, to, channel, index, n) of a valid request; ValueError otherwise."""
    if len(data) != REQUEST_BYTES or data[:4] != MAGIC:
        raise ValueError("not a relay request")
    head, mac = data[:-32], data[-32:]
    if not hmac.compare_digest(mac, hmac.new(key, head, hashlib.sha256).digest()):
        raise ValueError("relay request not made with the swarm's key")
    sent = int.from_bytes(head[80:88], "little")
    if abs((time.time() if now is None else now) - sent) > CLOCK_SKEW_S:
        raise ValueError("relay request too old or from the future")
    try:
        me = head[4:36].rstrip(b"\0").decode("ascii")
        to = head[36:68].rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("relay request ids are not ASCII") from None
    index, n = int.from_bytes(head[76:78], "little"), int.from_bytes(head[78:80], "little")
    if not me or not to or me == to or not 0 <= index < n <= 256:
        raise ValueError("bad relay request")
    return me, to, int.from_bytes(head[68:76], "little"), index, n


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("relay: timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("relay: connection closed")
        buf += chunk
    return bytes(buf)


class Relay:
    """Listens on host:port and splices requests pairwise (module docstring).
    Threads: one accepting, one per request being read (bounded by
    FairAdmission), two per spliced pair copying; close() ends them all."""

    def __init__(self, host: str, port: int, data_key: bytes):
        self._key = relay_key(data_key)
        self.data_key = data_key
        self._sock = socket.create_server((host, port), backlog=256)
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()[:2]
        self._requests = FairAdmission(64, 256, 128)
        self._waiting: dict[tuple, tuple[socket.socket, float]] = {}
        self._spliced: Counter[str] = Counter()  # spliced connections per asking id
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self.relayed_bytes = 0
        self.refused = 0
        self.pairs = 0
        self._thread = threading.Thread(target=self._accept_loop, name="relay-accept")
        self._thread.start()

    def set_data_key(self, data_key: bytes) -> None:
        """Requests from now on are checked against this key (an allowlist
        swarm's joiner learns the data key only once admitted)."""
        self._key, self.data_key = relay_key(data_key), data_key

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=self._run, args=(target, args), daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _run(self, target, args) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        while not self._closed:
            if self._waiting:
                self._expire()
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)
                continue
            token, why, victims = self._requests.acquire(addr[0], lambda s=sock: _shut(s))
            for cut in victims:
                cut()
            if why is not None:
                self._refuse(sock)
                continue
            self._spawn(self._read_request, sock, token)

    def _refuse(self, sock: socket.socket) -> None:
        sock.close()
        with self._lock:
            self.refused += 1

    def _read_request(self, sock: socket.socket, token: int) -> None:
        try:
            me, to, channel, index, n = parse_request(
                self._key, _recv_exact(sock, REQUEST_BYTES, time.monotonic() + REQUEST_TIMEOUT_S))
        except (OSError, ValueError):
            self._requests.release(token)
            self._refuse(sock)
            return
        self._requests.release(token)
        with self._lock:
            other = self._waiting.pop((to, me, channel, index), None)
            if other is None:
                mine = [k for k in self._waiting if k[0] == me]
                if len(self._waiting) >= MAX_WAITING or len(mine) >= MAX_WAITING_PER_PEER or \
                        self._spliced[me] >= MAX_SPLICED_PER_PEER:
                    self.refused += 1
                    sock.close()
                    return
                old = self._waiting.pop((me, to, channel, index), None)
                self._waiting[(me, to, channel, index)] = (sock, time.monotonic())
            elif sum(self._spliced.values()) + 2 > MAX_SPLICED or \
                    max(self._spliced[me], self._spliced[to]) >= MAX_SPLICED_PER_PEER:
                self.refused += 2
                sock.close()
                other[0].close()
                return
            else:
                old = None
                self._spliced[me] += 1
                self._spliced[to] += 1
                self.pairs += 1
        if old is not None:
            old[0].close()  # the same connection asked again: the peer reconnected
        if other is None:
            return
        a, b = sock, other[0]
        try:
            a.settimeout(None)
            b.settimeout(None)
            a.sendall(OK)
            b.sendall(OK)
        except OSError:
            a.close()
            b.close()
            self._unsplice(me, to)
            return
        done = threading.Barrier(2)
        self._spawn(self._copy, a, b, done, me, to)
        self._spawn(self._copy, b, a, done, me, to)

    def _copy(self, src: socket.socket, dst: socket.socket, done: threading.Barrier,
              me: str, to: str) -> None:
        try:
            while True:
                chunk = src.recv(_COPY_BYTES)
                if not chunk:
                    break
                dst.sendall(chunk)
                with self._lock:
                    self.relayed_bytes += len(chunk)
        except OSError:
            pass
        _shut(src)
        _shut(dst)  # the other direction ends too
        try:
            if done.wait() == 0:  # the last of the two closes both
                src.close()
                dst.close()
                self._unsplice(me, to)
        except threading.BrokenBarrierError:
            pass

    def _unsplice(self, me: str, to: str) -> None:
        with self._lock:
            for p in (me, to):
                self._spliced[p] -= 1
                if self._spliced[p] <= 0:
                    del self._spliced[p]

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [k for k, (_, t) in self._waiting.items() if now - t > WAIT_S]
            socks = [self._waiting.pop(k)[0] for k in stale]
            self.refused += len(socks)
        for s in socks:
            s.close()

    @property
    def spliced(self) -> int:
        with self._lock:
            return sum(self._spliced.values()) // 2

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._sock.close()
        with self._lock:
            waiting = [s for s, _ in self._waiting.values()]
            self._waiting.clear()
            threads = list(self._threads)
        for s in waiting:
            s.close()
        for t in threads:
            t.join(5)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def connect_relayed(relay: tuple[str, int], data_key: bytes, me: str, peer: str,
                    channel: int, n_conns: int, timeout: float,
                    dial_timeout: float | None = None) -> Link:
    """A link to peer through the relay: n_conns requests, then the link
    handshake over the spliced connections, me as the client if my id is
    the smaller. Raises RelayRefused, TimeoutError, OSError or HandshakeError;
    no socket is left open on failure."""
    key = relay_key(data_key)
    deadline = time.monotonic() + timeout
    socks: list[socket.socket] = []
    try:
        for i in range(n_conns):
            try:
                s = socket.create_connection(relay, timeout=max(0.1, min(
                    deadline - time.monotonic(), dial_timeout or timeout)))
            except OSError as e:
                raise RelayUnreachable(f"relay {relay[0]}:{relay[1]}: {e}") from None
            socks.append(s)
            s.sendall(request(key, me, peer, channel, i, n_conns))
        for s in socks:
            try:
                if _recv_exact(s, len(OK), deadline) != OK:
                    raise RelayRefused("relay: unexpected answer")
            except ConnectionError as e:
                raise RelayRefused(f"relay refused or the other peer never came: {e}") from None
        if me < peer:
            return _client_link(socks, data_key, deadline)
        return _server_link(socks, data_key, deadline)
    except BaseException:
        for s in socks:
            s.close()
        raise


def _client_link(socks: list[socket.socket], key: bytes, deadline: float) -> Link:
    from peerlearn.transport.stream import _binding, _transcript

    link_id = os.urandom(16)
    transcripts = []
    for i, s in enumerate(socks):
        client = hs.ClientHandshake(key, link_id, i, len(socks))
        s.settimeout(max(0.01, deadline - time.monotonic()))
        s.sendall(client.hello())
        challenge = _recv_exact(s, hs.CHALLENGE_BYTES, deadline)
        s.sendall(client.on_challenge(challenge))
        client.on_accept(_recv_exact(s, hs.ACCEPT_BYTES, deadline))
        s.settimeout(None)
        transcripts.append(_transcript(client.hello(), challenge))
    return Link(socks, link_id, binding=_binding(transcripts))


def _server_link(socks: list[socket.socket], key: bytes, deadline: float) -> Link:
    from peerlearn.transport.stream import _binding, _transcript

    transcripts, link_id = [], None
    for i, s in enumerate(socks):
        server = hs.ServerHandshake(key)
        hello = _recv_exact(s, hs.HELLO_BYTES, deadline)
        challenge = server.on_hello(hello)
        s.settimeout(max(0.01, deadline - time.monotonic()))
        s.sendall(challenge)
        info, accept = server.on_proof(_recv_exact(s, hs.PROOF_BYTES, deadline))
        if info.conn_index != i or info.n_conns != len(socks) or \
                (link_id is not None and info.link_id != link_id):
            raise hs.HandshakeError("relayed connections out of order")
        link_id = info.link_id
        s.sendall(accept)
        s.settimeout(None)
        transcripts.append(_transcript(hello, challenge))
    return Link(socks, link_id, binding=_binding(transcripts))
