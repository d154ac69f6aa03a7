"""Links between two peers neither of which can be dialled (both `dial-back`).

PeerLinks' part for them (a mixin of datalinks.PeerLinks). Neither end can
accept the other's connection, so both ask a relay (a reachable member
running transport/relay.py; `relay`, tried in order, the same at both ends)
for the link at once, when their round or transfer needs it:

  * First for a rendezvous (transport/punch.py): the relay tells each end
    where the other's connections come from, and the two punch through
    their NATs, so the link's bytes never pass through the relay.
  * If the punch fails (a symmetric NAT maps the punch to a port the other
    end's filter never saw; punch.PUNCH_S), or either end did not ask, the
    relay splices the link as before (the end that did not ask gets the
    splice at once; the other ends up there too).

After a failed punch with a peer, that peer's links go straight to a splice
for PUNCH_RETRY_S: its NAT is unlikely to change, and each try costs up to
PUNCH_S. Over either link the smaller id greets and the other checks the
greeting names the peer it asked for (signed, as every greeting), so a
relay cannot hand a link to someone else. Counted: punched_links,
punch_failures, relayed_links.
"""

from __future__ import annotations

import logging
import threading
import time

from peerlearn.transport.punch import PunchFailed, connect_punched
from peerlearn.transport.relay import RelayUnreachable, connect_relayed
from peerlearn.transport.stream import Link, StreamError

log = logging.getLogger("peerlearn.links")

RELAY_DIAL_S = 3.0  # a relay that does not accept a connection within this is passed over
PUNCH_RETRY_S = 600.0
MAX_PUNCH_FAILURES = 1024  # peers whose failed punch is remembered
MAX_DIAL_LOCKS = 1024  # links being (or last) opened, one lock each


class DialBackLinks:
    """Needs PeerLinks' my_id, identity, secret, n_conns, _cv and _out."""

    def _init_dial_back(self, relay: list[tuple[str, int]] | None, hole_punch: bool) -> None:
        self.relay = relay or []  # relays (host, port) for links with other dial-back peers
        self.hole_punch = hole_punch
        self._dial_locks: dict[tuple[str, int], threading.Lock] = {}  # see _dial_lock
        self._punch_failed_at: dict[str, float] = {}
        self.punched_links = 0
        self.punch_failures = 0
        self.relayed_links = 0

    def _dial_lock(self, key: tuple[str, int]) -> threading.Lock:
        """The lock that makes concurrent callers opening the link `key`
        open one: the direct all-reduce opens a peer's send and receive side
        on two threads at once, and for a peer that cannot be dialled (or a
        link to one) both are the same link. Entries not held are dropped
        past MAX_DIAL_LOCKS (a bound, not a history)."""
        with self._cv:
            lock = self._dial_locks.get(key)
            if lock is None:
                if len(self._dial_locks) >= MAX_DIAL_LOCKS:
                    for k in [k for k, v in self._dial_locks.items() if not v.locked()]:
                        del self._dial_locks[k]
                lock = self._dial_locks[key] = threading.Lock()
            return lock

    def _relayed(self, peer: str, timeout: float, channel: int) -> Link:
        """The link with another dial-back peer: one link, both directions."""
        if not self.relay:
            raise StreamError(f"{peer} and this peer both cannot be dialled (NAT) and no "
                              "relay is configured (relay_via)")
        key = (peer, channel)
        with self._dial_lock(key):  # the round's send and receive side ask at once: one link
            with self._cv:
                link = self._out.get(key)
            if link is not None and link.healthy():
                return link
            if link is not None:
                link.close()
            deadline = time.monotonic() + timeout
            link = self._punched(peer, channel, timeout) if self._may_punch(peer) else None
            if link is None:
                link = self._through_a_relay(peer, channel, deadline - time.monotonic())[0]
                try:
                    self._greet_pair(link, peer, channel, max(0.1, deadline - time.monotonic()))
                except (StreamError, ValueError) as e:
                    link.close()
                    raise StreamError(f"relayed link to {peer}: {e}") from None
                with self._cv:
                    self.relayed_links += 1
            with self._cv:
                self._out[key] = link
            return link

    def _may_punch(self, peer: str) -> bool:
        if not self.hole_punch:
            return False
        with self._cv:
            failed = self._punch_failed_at.get(peer)
        return failed is None or time.monotonic() - failed >= PUNCH_RETRY_S

    def _punched(self, peer: str, channel: int, timeout: float) -> Link | None:
        """A greeted link with peer through a rendezvous: punched, or spliced
        if peer did not ask to punch; None if the punch failed (counted)."""
        try:
            link, punched = self._through_a_relay(peer, channel, timeout, punch=True)
        except PunchFailed as e:
            self._punch_failed(peer, channel, e)
            return None
        try:
            self._greet_pair(link, peer, channel, timeout)
        except (StreamError, ValueError) as e:
            link.close()
            if punched:  # the other end may have given up the punch meanwhile
                self._punch_failed(peer, channel, e)
                return None
            raise StreamError(f"relayed link to {peer}: {e}") from None
        with self._cv:
            if punched:
                self.punched_links += 1
            else:
                self.relayed_links += 1
        if punched:
            log.info("%s punched a link to %s (channel %d): %s", self.my_id[:8], peer[:8],
                     channel, link.remote_host())
        return link

    def _punch_failed(self, peer: str, channel: int, why: BaseException) -> None:
        with self._cv:
            self.punch_failures += 1
            self._punch_failed_at.pop(peer, None)
            self._punch_failed_at[peer] = time.monotonic()
            if len(self._punch_failed_at) > MAX_PUNCH_FAILURES:
                self._punch_failed_at.pop(next(iter(self._punch_failed_at)))
        log.info("%s could not punch a link to %s (channel %d), relaying it: %s",
                 self.my_id[:8], peer[:8], channel, why)

    def _greet_pair(self, link: Link, peer: str, channel: int, timeout: float) -> None:
        """The smaller id greets, the other checks the greeting names peer."""
        from peerlearn.swarm.datalinks import read_greeting, send_greeting, traffic_of

        if self.my_id < peer:
            send_greeting(link, self.my_id, channel, timeout, self.identity)
        else:
            name, ch = read_greeting(link, timeout, verify=self.identity is not None)
            if (name, ch) != (peer, channel):
                raise StreamError(f"greeted as {name} on channel {ch}, not {peer} on {channel}")
        link.traffic = traffic_of(channel)

    def _through_a_relay(self, peer: str, channel: int, timeout: float,
                         punch: bool = False) -> tuple[Link, bool]:
        """(link, punched) through the first relay that answers, in the
        configured order (the same at both ends, so both meet at the same
        one): a relay that is gone refuses or times out its connection
        within RELAY_DIAL_S and the next is tried. Raises PunchFailed (punch
        agreed, failed) or StreamError."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        for address in self.relay:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if punch:
                    return connect_punched(address, self.secret, self.my_id, peer, channel,
                                           self.n_conns, left,
                                           dial_timeout=min(RELAY_DIAL_S, left))
                return connect_relayed(address, self.secret, self.my_id, peer, channel,
                                       self.n_conns, left,
                                       dial_timeout=min(RELAY_DIAL_S, left)), False
            except RelayUnreachable as e:
                last = e
        raise StreamError(f"no relay reachable for a link to {peer}: {last}")
