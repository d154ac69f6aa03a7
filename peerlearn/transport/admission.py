"""Bounds on what an unauthenticated sender can make a listener spend.

A listener admits a connection into a handshake (one thread and one
descriptor, for at most one handshake deadline) only while fewer than
`per_source` handshakes from the same address and fewer than `total`
handshakes overall are in progress; the rest are closed at once and counted.
Sockets of authenticated but not yet complete links are bounded the same way
(`pending_*`), since a member holding the key could otherwise park sockets
without end.

The per-source key is the IP address (an IPv6 address as a whole /128: a
sender with a whole prefix is held back by the total, not the per-source cap).
"""

from __future__ import annotations

import resource
import threading
from collections import Counter

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
