"""Bounds on what an unauthenticated sender can make a listener spend.

A listener admits a connection into a handshake (one thread and one
descriptor, for at most one handshake deadline) only while fewer than
`per_source` handshakes from the same address and fewer than `total`
handshakes overall are in progress; the rest are closed at once and counted.
Sockets of authenticated but not yet complete links are bounded the same way
(`pending_*`), since a member holding the key could otherwise park sockets
without end.

The per-source key is the IP address. Addresses are also grouped by prefix
(`prefix_of`: an IPv4 /24, an IPv6 /64), with a cap per prefix: one sender
holding a prefix (17 addresses of one /24, or an IPv6 /64, which is 2^64
addresses) used to fill every slot with the per-address cap times many
addresses. `FairAdmission` also never lets the total be held by a few
prefixes against a newcomer: when it is full, a newcomer from a prefix holding
fewer slots than the busiest one takes that prefix's oldest slot (its holder
is cut off, the eviction counted). Honest handshakes, greetings and link
completions take milliseconds; what sits in a slot the longest is what an
attacker parked there. A sender spread over more prefixes than the total has
slots (a botnet) can still keep a newcomer waiting.
"""

from __future__ import annotations

import ipaddress
import itertools
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable

_fd_limit_raised = False
_fd_limit_lock = threading.Lock()


def raise_fd_limit() -> tuple[int, int]:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit, once.

    Called when a listener starts (the first place a peer holds many
    sockets): a 1024 soft limit is one flood of idle connections away from
    EMFILE. Returns the (soft, hard) limits now in force; never raises.
    """
    global _fd_limit_raised
    with _fd_limit_lock:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if not _fd_limit_raised and soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass  # e.g. an unlimited hard limit some kernels refuse; keep what we have
        _fd_limit_raised = True
        return soft, hard


class Admission:
    """Counts in-progress slots per source address and in total (thread-safe).

    Invariant: for every key, held(key) <= per_source and the sum over keys
    <= total; every successful acquire() is matched by exactly one release().
    """

    def __init__(self, per_source: int, total: int):
        if per_source < 1 or total < 1:
            raise ValueError("admission limits must be at least 1")
        self.per_source = per_source
        self.total = total
        self._held: Counter[str] = Counter()
        self._sum = 0
        self._lock = threading.Lock()

    def acquire(self, source: str) -> str | None:
        """None if a slot was taken, else why not (the caller refuses and counts)."""
        with self._lock:
            if self._sum >= self.total:
                return "too many in progress"
            if self._held[source] >= self.per_source:
                return "too many in progress from one address"
            self._held[source] += 1
            self._sum += 1
            return None

    def release(self, source: str) -> None:
        with self._lock:
            self._held[source] -= 1
            self._sum -= 1
            if self._held[source] <= 0:
                del self._held[source]

    def held(self, source: str | None = None) -> int:
        with self._lock:
            return self._sum if source is None else self._held.get(source, 0)


def prefix_of(source: str) -> str:
    """The prefix an address is grouped under: "a.b.c/24" for IPv4 (an
    IPv4-mapped IPv6 address included), the /64 for IPv6; anything else
    (a name, a malformed string) is its own prefix."""
    try:
        ip = ipaddress.ip_address(source.strip("[]").split("%", 1)[0])
    except ValueError:
        return source
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


class FairAdmission:
    """Slots held per source address, per prefix (prefix_of) and in total,
    fairly (thread-safe).

    acquire(source, evict) takes a slot, or says why not: a source at
    per_source, or a prefix at per_prefix, is refused. When the total is full
    the oldest slot of the busiest prefix is taken from its holder (its
    `evict` callback is returned to the caller, to run once the caller's own
    locks are released: it must cut the holder off, e.g. shut its socket
    down) provided that prefix holds more than one slot more than the
    newcomer's; else the newcomer is refused.

    Invariant: for every source held <= per_source, for every prefix
    <= per_prefix, in all <= total. release(token) frees a slot once; a slot
    taken by eviction is already free (its release is a no-op).
    """

    def __init__(self, per_source: int, total: int, per_prefix: int | None = None):
        per_prefix = total if per_prefix is None else per_prefix
        if min(per_source, total, per_prefix) < 1:
            raise ValueError("admission limits must be at least 1")
        self.per_source, self.per_prefix, self.total = per_source, per_prefix, total
        # token -> (source, prefix, since, evict); insertion order is age order.
        self._slots: dict[int, tuple[str, str, float, Callable[[], None]]] = {}
        self._by_source: Counter[str] = Counter()
        self._by_prefix: Counter[str] = Counter()
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self.evicted = 0

    def acquire(self, source: str, evict: Callable[[], None] = lambda: None
                ) -> tuple[int | None, str | None, list[Callable[[], None]]]:
        """(token, None, evictions to run) when a slot was taken; else
        (None, why, [])."""
        prefix = prefix_of(source)
        with self._lock:
            if self._by_source[source] >= self.per_source:
                return None, "too many in progress from one address", []
            if self._by_prefix[prefix] >= self.per_prefix:
                return None, "too many in progress from one address prefix", []
            victims: list[Callable[[], None]] = []
            if len(self._slots) >= self.total:
                busiest, n = self._by_prefix.most_common(1)[0]
                if n <= self._by_prefix[prefix] + 1:
                    return None, "too many in progress", []
                token = next(t for t, slot in self._slots.items() if slot[1] == busiest)
                victims.append(self._slots[token][3])
                self._drop(token)
                self.evicted += 1
            token = next(self._tokens)
            self._slots[token] = (source, prefix, time.monotonic(), evict)
            self._by_source[source] += 1
            self._by_prefix[prefix] += 1
            return token, None, victims

    def _drop(self, token: int) -> None:
        source, prefix, _, _ = self._slots.pop(token)
        for counter, key in ((self._by_source, source), (self._by_prefix, prefix)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def release(self, token: int | None) -> None:
        if token is None:
            return
        with self._lock:
            if token in self._slots:
                self._drop(token)

    def held(self, source: str | None = None) -> int:
        with self._lock:
            return len(self._slots) if source is None else self._by_source.get(source, 0)

    def held_by_prefix(self, prefix: str) -> int:
        with self._lock:
            return self._by_prefix.get(prefix, 0)
