"""TCP hole punching for a link between two peers neither of which can be dialled.

Two peers behind NATs (`dial-back`) cannot connect to each other, but a NAT
with endpoint-independent mapping gives a local port the same public port
whatever it talks to, and lets in packets from an endpoint that port has
sent to. So each end opens its connection i to a relay (transport/relay.py)
from a port of its own, asks there for a rendezvous with the other
(wire/relay.py, flag PUNCH), and learns where the relay saw the other's
connection i come from. Both answers leave the relay together; each end at
once connects from its port to the other's: the SYNs cross, each opens the
hole the other's comes through (TCP simultaneous open, or the plain
handshake when one SYN was dropped by the far NAT before its own left),
and connection i is up with no listener anywhere on the path. The link
handshake (the smaller id as client) and the signed greeting then run over
the punched connections as over spliced ones: the relay learns the two
endpoints and nothing else, and no byte of the link passes through it.

What needs what:

  * The connection to the relay stays open while we punch (its NAT mapping
    is the one the punch must reuse), so both sockets are bound with
    SO_REUSEADDR and SO_REUSEPORT to the one local port.
  * Two ends behind one NAT see the same public address, and a NAT that
    does not hairpin drops what is sent to it: they connect to each
    other's local address instead (the relay passes it on), their LAN.
  * With no NAT between them a SYN reaches the other's host before its own
    connect and is refused (RST): each end also listens on its port while
    it punches and takes the other's connection there, from the other's
    endpoint only.
  * A symmetric NAT maps the punch to another public port than the one
    the relay saw, which the far end's filter drops: after PUNCH_S the ends
    give up (PunchFailed) and the caller asks the relay for a splice.

When the other end did not ask to punch, the relay splices the pair and
connect_punched returns that relayed link, so both ends always agree.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from peerlearn.transport.link import Link
from peerlearn.transport.relay import ask, link_over
from peerlearn.wire import handshake as hs

# Both ends are told at once, so their SYNs normally cross in the first
# one-way delay; a SYN dropped by the far NAT is sent again by the kernel
# after 1 s. Beyond this the NAT does not let the punch through.
PUNCH_S = 3.0
_RETRY_S = 0.05  # after a refused connect (the far end not connecting yet)


class PunchFailed(OSError):
    """Both ends asked to punch, and the connections did not come through."""


def _reusable(family: int, local: tuple[str, int]) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(local)
        s.setblocking(False)
        return s
    except BaseException:
        s.close()
        raise


def target_of(answer: tuple[tuple[str, int], ...]) -> tuple[str, int]:
    """Where to punch to, from the relay's answer (you, other, other_local):
    behind the same address as ours, the other is on our side of the NAT."""
    you, other, other_local = answer
    return other_local if other[0] == you[0] else other


def open_punched(local: tuple[str, int], target: tuple[str, int],
                 deadline: float) -> socket.socket:
    """A TCP connection between local (ours, bound again) and target, opened
    by connecting from local while listening on it, whichever comes first;
    PunchFailed at the deadline. The socket is blocking, with no timeout."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    listener = _reusable(family, local)
    conn: socket.socket | None = None
    try:
        listener.listen(4)
        retry_at = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise PunchFailed(f"no connection with {target[0]}:{target[1]} within the "
                                  "punch's time (a NAT in between filters it)")
            if conn is None and now >= retry_at:
                conn = _reusable(family, local)
                err = conn.connect_ex(target)
                if err not in (0, errno.EINPROGRESS):
                    conn.close()
                    conn, retry_at = None, now + _RETRY_S
                    if err not in (errno.ECONNREFUSED, errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                        raise PunchFailed(f"connect to {target[0]}:{target[1]}: "
                                          f"{errno.errorcode.get(err, err)}")
                    continue
            wait = deadline - now if conn is not None else max(0.0, retry_at - now)
            readable, writable, _ = select.select(
                [listener], [conn] if conn is not None else [], [], min(wait, 0.5))
            if writable:
                err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    conn.setblocking(True)
                    got, conn = conn, None
                    return got
                # Refused: the other's host had no socket for us yet (no NAT
                # in between). It will connect, or we try again shortly.
                conn.close()
                conn, retry_at = None, time.monotonic() + _RETRY_S
            if readable:
                try:
                    accepted, addr = listener.accept()
                except OSError:
                    continue
                if (addr[0], addr[1]) == target:
                    accepted.setblocking(True)
                    return accepted
                accepted.close()  # not the peer we were told of
    finally:
        listener.close()
        if conn is not None:
            conn.close()


def connect_punched(relay: tuple[str, int], data_key: bytes, me: str, peer: str,
                    channel: int, n_conns: int, timeout: float,
                    dial_timeout: float | None = None,
                    punch_s: float | None = None) -> tuple[Link, bool]:
    """A link to peer: punched (True) if both ends asked the relay to, else
    spliced through it (False). Raises PunchFailed when both asked and the
    punch or its link handshake failed (then ask the relay for a splice:
    relay.connect_relayed), else what relay.ask and the handshake raise. No
    socket is left open on failure."""
    punch_s = PUNCH_S if punch_s is None else punch_s
    deadline = time.monotonic() + timeout
    socks, answers = ask(relay, data_key, me, peer, channel, n_conns, timeout, dial_timeout,
                         punch=True)
    if answers is None:
        try:
            return link_over(socks, data_key, me < peer, deadline), False
        except BaseException:
            for s in socks:
                s.close()
            raise
    punch_deadline = min(deadline, time.monotonic() + punch_s)
    punched: list[socket.socket] = []
    errors: list[BaseException] = []
    try:
        with ThreadPoolExecutor(max_workers=min(len(socks), 32)) as pool:
            futs = [pool.submit(open_punched, s.getsockname()[:2], target_of(a), punch_deadline)
                    for s, a in zip(socks, answers)]
            for fut in futs:
                try:
                    punched.append(fut.result())
                except BaseException as e:  # noqa: BLE001 - raised below, after cleanup
                    errors.append(e)
    finally:
        for s in socks:
            s.close()  # the punched connections hold the NAT's mappings now
    try:
        if errors:
            raise errors[0]
        # Over a connection that is up, the handshake is a few round trips.
        return link_over(punched, data_key, me < peer,
                         min(deadline, time.monotonic() + punch_s)), True
    except (OSError, hs.HandshakeError) as e:
        for s in punched:
            s.close()
        if isinstance(e, PunchFailed):
            raise
        raise PunchFailed(f"punched connections to {peer}: {type(e).__name__}: {e}") from None
    except BaseException:
        for s in punched:
            s.close()
        raise
