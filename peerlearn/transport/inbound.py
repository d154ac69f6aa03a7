"""Bounds on the control connections a peer accepts (I/O only).

zmq's ROUTER accepts every TCP connection and has no cap of its own: a member
holding the secret (or a stranger, until its handshake fails) could open
connections until the process ran out of descriptors, and the peer's own
dealers, data links and checkpoint files would then fail. The control plane's
monitor reports each accepted connection with its descriptor; this table
gives it a slot in a FairAdmission (per source address, per address prefix
and in total, a newcomer from a quieter prefix taking the busiest prefix's
oldest slot when all are held). A connection that gets no slot, and one whose
slot is taken, is cut: shutdown() on a duplicate of its descriptor, which
zmq sees as the peer hanging up, so it closes the connection and its
descriptor itself.

Why per address and not per key: the CURVE key of a connection is known only
to the ZAP handler, which zmq does not tie to a descriptor, and a key costs
nothing to make; an address is what a sender cannot multiply for free.
Peers of a one-machine swarm all connect from 127.0.0.1, so the per-source
bound leaves room for hundreds of them.

Descriptors are reused as soon as zmq closes them, and the monitor's events
are read later, on the loop: before a descriptor is cut it is checked to be
still a connection to our port from the address recorded when it was
accepted, so a reused descriptor is never touched.

Owned by the loop that reads the monitor: not thread-safe on its own (the
FairAdmission inside is, but the descriptor table is not).
"""

from __future__ import annotations

import logging
import os
import socket

from peerlearn.transport.admission import FairAdmission

log = logging.getLogger(__name__)

# A swarm has at most wire.control.MAX_MEMBERS (1024) members, each holding
# one connection to every other, plus status queriers and joiners.
MAX_INBOUND = 1280
MAX_INBOUND_PER_SOURCE = 384
MAX_INBOUND_PER_PREFIX = 640


def _endpoints(fd: int) -> tuple[int, tuple[str, int]] | None:
    """(local port, (remote host, remote port)) of the socket at fd, or None
    when fd is no longer an open TCP socket."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        local, remote = s.getsockname(), s.getpeername()
        return int(local[1]), (str(remote[0]), int(remote[1]))
    except (OSError, IndexError, TypeError, ValueError):
        return None
    finally:
        s.close()


class InboundConnections:
    """The control listener's accepted connections, each holding one slot.

    Invariant: every descriptor in the table holds one slot (or held one
    until it was evicted and cut); a descriptor leaves the table at its
    DISCONNECTED event, which frees its slot.
    """

    def __init__(self, local_port: int, *, total: int = MAX_INBOUND,
                 per_source: int = MAX_INBOUND_PER_SOURCE,
                 per_prefix: int = MAX_INBOUND_PER_PREFIX):
        self.local_port = local_port
        self._slots = FairAdmission(min(per_source, total), total, min(per_prefix, total))
        self._by_fd: dict[int, tuple[int, tuple[str, int]]] = {}  # fd -> (token, remote)
        self.refused = 0  # cut at once: no slot for it

    @property
    def evicted(self) -> int:
        """Connections cut to make room for one from a quieter prefix."""
        return self._slots.evicted

    @property
    def held(self) -> int:
        return self._slots.held()

    def accepted(self, fd: int) -> str | None:
        """Takes a slot for the connection zmq accepted at fd, or cuts it.
        Returns its source address (None if it is already gone)."""
        self.disconnected(fd)  # a DISCONNECTED we never saw: fd is reused
        ends = _endpoints(fd)
        if ends is None or ends[0] != self.local_port:
            return None
        remote = ends[1]
        token, why, victims = self._slots.acquire(remote[0], lambda: self._cut(fd, remote))
        for cut in victims:
            cut()
        if token is None:
            self.refused += 1
            log.debug("cut a control connection from %s:%d: %s", *remote, why)
            self._cut(fd, remote)
        else:
            self._by_fd[fd] = (token, remote)
        return remote[0]

    def disconnected(self, fd: int) -> str | None:
        """Frees fd's slot; returns its source address if it held one."""
        entry = self._by_fd.pop(fd, None)
        if entry is None:
            return None
        self._slots.release(entry[0])
        return entry[1][0]

    def _cut(self, fd: int, remote: tuple[str, int]) -> None:
        """Shuts the connection at fd down if fd is still that connection."""
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        try:
            if s.getsockname()[1] == self.local_port and \
                    (s.getpeername()[0], s.getpeername()[1]) == remote:
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the peer or by zmq
        finally:
            s.close()
