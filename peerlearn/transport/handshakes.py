"""Following control handshakes (a mixin of ControlPlane, control.py).

Incoming: failed CURVE handshakes (strangers, peers with another secret) are
counted and logged, at most once a minute (REFUSED_LOG_EVERY_S), with their
count and source addresses; accepted connections are held to their bounds
(inbound.py). Outgoing: each new connection is watched until its first
handshake succeeds, so a joiner whose handshakes are refused learns it in
about a second (`refused`) instead of waiting out its join timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("peerlearn.transport.control")

_FAILED_HANDSHAKE = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# Refused handshakes are logged once, then at most once per this many seconds.
REFUSED_LOG_EVERY_S = 60.0
# An outgoing connection whose handshake failed this many times in a row, and
# never succeeded, is refused (`ControlPlane.refused`): a wrong secret fails
# every attempt, about one per reconnect interval (0.1 s, doubling to 2 s).
REFUSED_AFTER = 3
_WATCHES_MAX = 64  # outgoing connections watched at once (each holds a monitor: 2 sockets)


class HandshakeWatching:
    """Mixed into ControlPlane, whose attributes these methods use."""

    def _watch(self, address: str, server_pub: bytes, d: zmq.asyncio.Socket) -> None:
        """Follows d's handshakes until one succeeds (then the monitor goes)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # driven without a loop: nothing reads a monitor
        if len(self._watches) >= _WATCHES_MAX:
            return
        key = (address, server_pub)
        mon = d.get_monitor_socket(_FAILED_HANDSHAKE | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._outcomes[key] = [0, False]
        self._watches[key] = (mon, loop.create_task(self._read_outcomes(key, d, mon)))

    async def _read_outcomes(self, key, d: zmq.asyncio.Socket, mon: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._outcomes.pop(key, None)
                    break
                outcome = self._outcomes.setdefault(key, [0, False])
                outcome[0] += 1
                outcome[1] = event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        except (zmq.ZMQError, asyncio.CancelledError):
            return
        self._unwatch(key, d)

    def _unwatch(self, key, d: zmq.asyncio.Socket | None) -> None:
        watch = self._watches.pop(key, None)
        if watch is None:
            return
        mon, task = watch
        if task is not asyncio.current_task():
            task.cancel()
        if d is not None and not d.closed:
            try:
                d.disable_monitor()
            except zmq.ZMQError:
                pass
        mon.close(linger=0)

    def refused(self, address: str, to: str | None = None) -> str | None:
        """Why the peer at address refuses our control connection, once it
        failed REFUSED_AFTER handshakes in a row and none succeeded, or refused
        our key (an allowlist swarm, once is final); else None.
        It did answer (TCP connected): the credentials differ. Plain reads,
        safe from any thread; `to` as for send()."""
        server_pub = self._server_pub if self._peer_servers is None \
            else self._peer_servers.get(to or "")
        outcome = self._outcomes.get((address, server_pub))
        if outcome is None:
            return None
        n, by_key = outcome
        if by_key:  # the server's authenticator said no: zmq does not try again
            return ("answered, but refused this peer's key: its identity is not on that "
                    "swarm's allowlist")
        if n < REFUSED_AFTER:
            return None
        if self._peer_servers is None:
            return (f"answered, but the control handshake failed {n} times: this peer's swarm "
                    "secret is not that swarm's (check --secret-file or $PEERLEARN_SECRET), or "
                    "that port is not a peerlearn control port")
        return (f"answered, but the control handshake failed {n} times: the peer there is not "
                f"{to} (not the key the allowlist names), or that port is not a peerlearn "
                "control port")

    async def watch_handshakes(self) -> None:
        """Counts failed CURVE handshakes (strangers, peers with another
        secret) and logs them (_log_refused), and holds accepted connections
        to their bounds (self.inbound: without this task they are unbounded);
        run as a task until close()."""
        failed = False  # a failure's DISCONNECTED names its descriptor next
        try:
            while True:
                if self._refused_from:  # say what was refused once the minute is up
                    wait = REFUSED_LOG_EVERY_S - (time.monotonic() - self._refused_logged_at)
                    if wait <= 0 or not await self._monitor.poll(int(wait * 1000) + 1):
                        self._log_refused(time.monotonic())
                        continue
                event = parse_monitor_message(await self._monitor.recv_multipart())
                kind, value = event["event"], event["value"]
                if kind == zmq.EVENT_ACCEPTED:
                    self.inbound.accepted(value)
                elif kind == zmq.EVENT_DISCONNECTED:
                    source = self.inbound.disconnected(value)
                    if failed:
                        failed = False
                        self._refused(source)
                elif kind & _FAILED_HANDSHAKE:
                    self.failed_handshakes += 1
                    failed = True
        except (zmq.ZMQError, asyncio.CancelledError):
            return

    def _refused(self, source: str | None) -> None:
        self._refused_from[source or "an unknown address"] += 1
        now = time.monotonic()
        if self._refused_logged_at is None or \
                now - self._refused_logged_at >= REFUSED_LOG_EVERY_S:
            self._log_refused(now)

    def _log_refused(self, now: float) -> None:
        """One WARNING: how many handshakes were refused since the last one,
        from where (the first at once, then at most one a minute)."""
        n = sum(self._refused_from.values())
        top = self._refused_from.most_common(3)
        who = top[0][0] if len(top) == 1 else ", ".join(f"{addr} ({k})" for addr, k in top)
        if len(self._refused_from) > len(top):
            who += f" and {len(self._refused_from) - len(top)} more addresses"
        since = "" if self._refused_logged_at is None else \
            f" in the last {now - self._refused_logged_at:.0f} s"
        why = "a peer with another swarm secret, or a stranger" if self._peer_servers is None \
            else "a key not on the allowlist, or a stranger"
        log.warning("%s refused %d control handshake%s%s from %s: %s (said at most once "
                    "a minute)", self.peer_id[:8], n, "" if n == 1 else "s", since, who, why)
        self._refused_from.clear()
        self._refused_logged_at = now
