"""A relay for links between two peers neither of which can be dialled.

Two peers behind NATs (`dial-back`) cannot open a TCP connection to each
other. Each opens its link's connections to a relay instead (a reachable
member that runs one), asking on each for the other peer; the relay pairs
connection i of one with connection i of the other and copies bytes both
ways. Over the spliced connections the two run the ordinary link handshake
(the smaller id as client) and greeting, end to end: the relay sees only
what any on-path member sees, and cannot complete a link in either peer's
name without its identity key.

The requests and answers are in wire/relay.py. What a client can make a
relay hold is bounded: requests waiting for their other half (MAX_WAITING
in all, MAX_WAITING_PER_PEER per asking id, each for at most WAIT_S), and
spliced connections (MAX_SPLICED in all, MAX_SPLICED_PER_PEER per id); a
request past a bound is refused (closed, counted). A rendezvous for a hole
punch (transport/punch.py) holds nothing once answered: the relay answers
both halves and closes them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from peerlearn.transport.admission import FairAdmission
from peerlearn.transport.link import Link
from peerlearn.wire import handshake as hs
from peerlearn.wire.relay import (  # noqa: F401 - re-exported: the format's users import it here
    ANSWER_BYTES,
    OK,
    PUNCH_ANSWER,
    REQUEST_BYTES,
    Request,
    parse_punch_answer,
    parse_request,
    punch_answer,
    relay_key,
    request,
)

WAIT_S = 10.0
REQUEST_TIMEOUT_S = 5.0
MAX_WAITING, MAX_WAITING_PER_PEER = 1024, 64
MAX_SPLICED, MAX_SPLICED_PER_PEER = 256, 64
_COPY_BYTES = 1 << 18


class RelayRefused(OSError):
    """The relay closed a request (over a bound, or the other half never came)."""


class RelayUnreachable(OSError):
    """No connection to the relay could be opened (it is gone): try another."""


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
        self._waiting: dict[tuple, tuple[socket.socket, float, Request]] = {}
        self._spliced: Counter[str] = Counter()  # spliced connections per asking id
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self.relayed_bytes = 0
        self.refused = 0
        self.pairs = 0
        self.rendezvous = 0  # pairs told each other's endpoints for a hole punch
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
            req = parse_request(
                self._key, _recv_exact(sock, REQUEST_BYTES, time.monotonic() + REQUEST_TIMEOUT_S))
        except (OSError, ValueError):
            self._requests.release(token)
            self._refuse(sock)
            return
        self._requests.release(token)
        me, to, channel, index = req.me, req.to, req.channel, req.index
        with self._lock:
            other = self._waiting.pop((to, me, channel, index), None)
            rendezvous = other is not None and req.punch and other[2].punch
            if other is None:
                mine = [k for k in self._waiting if k[0] == me]
                if len(self._waiting) >= MAX_WAITING or len(mine) >= MAX_WAITING_PER_PEER or \
                        self._spliced[me] >= MAX_SPLICED_PER_PEER:
                    self.refused += 1
                    sock.close()
                    return
                old = self._waiting.pop((me, to, channel, index), None)
                self._waiting[(me, to, channel, index)] = (sock, time.monotonic(), req)
            elif rendezvous:
                old = None
                self.rendezvous += 1
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
        if rendezvous:
            self._introduce(a, req, b, other[2])
            return
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

    @staticmethod
    def _introduce(a: socket.socket, req_a: Request, b: socket.socket, req_b: Request) -> None:
        """Tells each half of a rendezvous where the other is, then lets both
        go: nothing is held once the answers are out (the clients keep
        their ends open while they punch, so their NATs keep the mappings)."""
        try:
            seen_a, seen_b = a.getpeername()[:2], b.getpeername()[:2]
            answers = (punch_answer(seen_a, seen_b, req_b.local),
                       punch_answer(seen_b, seen_a, req_a.local))
            for s, answer in zip((a, b), answers):
                s.settimeout(REQUEST_TIMEOUT_S)
                s.sendall(answer)
        except (OSError, ValueError):
            pass  # the client sees its connection close without an answer: no punch
        finally:
            a.close()
            b.close()

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
            stale = [k for k, (_, t, _) in self._waiting.items() if now - t > WAIT_S]
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
            waiting = [s for s, _, _ in self._waiting.values()]
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
    deadline = time.monotonic() + timeout
    socks, _ = ask(relay, data_key, me, peer, channel, n_conns, timeout, dial_timeout)
    try:
        return link_over(socks, data_key, me < peer, deadline)
    except BaseException:
        for s in socks:
            s.close()
        raise


def link_over(socks: list[socket.socket], data_key: bytes, client: bool,
              deadline: float) -> Link:
    """The link handshake over connected sockets, in their order (both ends
    must list them alike); the caller closes them if it raises."""
    return (_client_link if client else _server_link)(socks, data_key, deadline)


def _dial(relay: tuple[str, int], timeout: float, reusable: bool) -> socket.socket:
    if not reusable:
        return socket.create_connection(relay, timeout=timeout)
    family = socket.getaddrinfo(relay[0], relay[1], type=socket.SOCK_STREAM)[0][0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        # The punch leaves from this very port while this connection is
        # still open (it keeps the NAT's mapping alive): both must allow it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        s.settimeout(timeout)
        s.connect(relay)
        return s
    except BaseException:
        s.close()
        raise


def ask(relay: tuple[str, int], data_key: bytes, me: str, peer: str, channel: int,
        n_conns: int, timeout: float, dial_timeout: float | None = None, *,
        punch: bool = False) -> tuple[list[socket.socket], list | None]:
    """n_conns requests for peer. Returns the connections, spliced (and None),
    or, when both ends asked to punch, still open with the relay's answers
    (parse_punch_answer's tuples, in connection order). Raises
    RelayUnreachable (no connection to the relay), RelayRefused,
    TimeoutError; no socket is left open on failure."""
    key = relay_key(data_key)
    deadline = time.monotonic() + timeout
    answers: list = []

    def one(i: int) -> socket.socket:
        try:
            s = _dial(relay, max(0.1, min(deadline - time.monotonic(), dial_timeout or timeout)),
                      punch)
        except OSError as e:
            raise RelayUnreachable(f"relay {relay[0]}:{relay[1]}: {e}") from None
        try:
            s.sendall(request(key, me, peer, channel, i, n_conns,
                              punch_from=s.getsockname()[:2] if punch else None))
            return s
        except BaseException:
            s.close()
            raise

    # All at once: one at a time, each connection cost a round trip more.
    socks = _parallel(one, range(n_conns), cleanup=socket.socket.close)
    try:
        for s in socks:
            try:
                got = _recv_exact(s, len(OK), deadline)
                if got == PUNCH_ANSWER and punch:
                    answers.append(parse_punch_answer(
                        got + _recv_exact(s, ANSWER_BYTES - len(got), deadline)))
                elif got != OK:
                    raise RelayRefused("relay: unexpected answer")
            except ConnectionError as e:
                raise RelayRefused(f"relay refused or the other peer never came: {e}") from None
            except ValueError as e:
                raise RelayRefused(f"relay: {e}") from None
        if answers and len(answers) != len(socks):
            raise RelayRefused("relay: some connections spliced, some introduced")
        return socks, answers or None
    except BaseException:
        for s in socks:
            s.close()
        raise


def _parallel(fn, items, cleanup=None) -> list:
    """fn of each item on a thread of its own, the results in order. If any
    raises, the first error is raised once all have ended, after cleanup of
    the others' results."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), 32))) as pool:
        futs = [pool.submit(fn, x) for x in items]
    results, errors = [], []
    for f in futs:
        try:
            results.append(f.result())
        except BaseException as e:  # noqa: BLE001 - raised below, after cleanup
            errors.append(e)
    if errors:
        for r in results:
            if cleanup is not None:
                cleanup(r)
        raise errors[0]
    return results


def _client_link(socks: list[socket.socket], key: bytes, deadline: float) -> Link:
    from peerlearn.transport.stream import _binding, _transcript

    link_id = os.urandom(16)

    def one(i: int) -> bytes:
        s = socks[i]
        client = hs.ClientHandshake(key, link_id, i, len(socks))
        s.settimeout(max(0.01, deadline - time.monotonic()))
        s.sendall(client.hello())
        challenge = _recv_exact(s, hs.CHALLENGE_BYTES, deadline)
        s.sendall(client.on_challenge(challenge))
        client.on_accept(_recv_exact(s, hs.ACCEPT_BYTES, deadline))
        s.settimeout(None)
        return _transcript(client.hello(), challenge)

    transcripts = _parallel(one, range(len(socks)))
    return Link(socks, link_id, binding=_binding(transcripts))


def _server_link(socks: list[socket.socket], key: bytes, deadline: float) -> Link:
    from peerlearn.transport.stream import _binding, _transcript

    def one(i: int) -> tuple[bytes, bytes]:
        s = socks[i]
        server = hs.ServerHandshake(key)
        hello = _recv_exact(s, hs.HELLO_BYTES, deadline)
        challenge = server.on_hello(hello)
        s.settimeout(max(0.01, deadline - time.monotonic()))
        s.sendall(challenge)
        info, accept = server.on_proof(_recv_exact(s, hs.PROOF_BYTES, deadline))
        if info.conn_index != i or info.n_conns != len(socks):
            raise hs.HandshakeError("relayed connections out of order")
        s.sendall(accept)
        s.settimeout(None)
        return info.link_id, _transcript(hello, challenge)

    done = _parallel(one, range(len(socks)))
    if len({link_id for link_id, _ in done}) != 1:  # the caller closes the sockets
        raise hs.HandshakeError("relayed connections of different links")
    return Link(socks, done[0][0], binding=_binding([t for _, t in done]))
