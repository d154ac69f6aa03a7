"""SWIM on the daemon's loop, beside the heartbeats (issue 19).

With PeerConfig.swim the daemon runs a `SwimMember` (swim.py) over its
control plane: SWIM's messages ride the same CURVE-encrypted, authenticated
sockets as the round protocol's (wire/messages.py tells the two apart), so
the sender a probe names is the key that sent it. Its view is kept,
logged and exported (metrics, `peerlearn status`-style snapshots), and
decides nothing yet: RoundCore's liveness is still its own all-to-all
heartbeats, and a peer without `swim` drops SWIM messages (counted). What
is measured here is what SWIM costs and sees between real processes, which
the simulator only modelled; docs/swarm.md, "SWIM between real peers", has
the figures and what wiring it into the round logic still takes.

Owner: the loop. `receive`, `tick`, `seed` and `leave` run there, are
O(messages) and never block; sends go to the control plane, which queues
them (ControlPlane.send never blocks).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable

from peerlearn.swarm.swim import Changed, Send, SwimConfig, SwimMember

log = logging.getLogger("peerlearn.peer")

# Member changes remembered for snapshots and tests (id -> (state, when)).
MAX_CHANGES_KEPT = 4096


class SwimOnLoop:
    """A SwimMember, its sends handed to `send(to_id, address, msg)`.

    `address_of(id)`: the control address to answer a member on when SWIM
    says "on the connection it came from" (the plane has no such thing: it
    answers at the address the member advertises); None drops the answer.
    """

    def __init__(self, me: str, addr: str, now: float, *,
                 send: Callable[[str, str, object], None],
                 address_of: Callable[[str], str | None],
                 config: SwimConfig = SwimConfig(), rng: random.Random | None = None):
        # A restart must outrank what the others hold about this id (DEAD or
        # LEFT at the old incarnation, kept dead_keep seconds, beats a stale
        # ALIVE): incarnations start at the wall clock in ms, so a restarted
        # peer is taken back at once unless it refuted more often than once a
        # millisecond of its downtime.
        self.member = SwimMember(me, addr, now, rng or random.Random(), config,
                                 incarnation=time.time_ns() // 1_000_000)
        self.send, self.address_of = send, address_of
        self.joined = False
        self.sent: Counter[str] = Counter()  # message type -> count
        self.received: Counter[str] = Counter()
        self.unanswerable = 0  # answers to a member whose address we do not know
        self.changes = 0
        self.last_change: dict[str, tuple[str, float]] = {}  # member -> (state, when)

    # ------------------------------------------------------------ inputs

    def seed(self, now: float, members: list[tuple[str, str]]) -> None:
        """Join through these (id, control address) members, once: the view a
        Welcome or the record gave. A founder alone has none; the others'
        Joins reach it."""
        members = [(i, a) for i, a in members if i != self.member.me and a]
        if self.joined or not members:
            return
        self.joined = True
        self._run(now, self.member.join(now, members))

    def receive(self, now: float, src: str, msg) -> None:
        self.received[type(msg).__name__] += 1
        self._run(now, self.member.receive(now, src, msg))

    def tick(self, now: float) -> None:
        if now >= self.member.next_deadline():
            self._run(now, self.member.tick(now))

    def leave(self, now: float) -> None:
        self._run(now, self.member.leave(now))

    # ------------------------------------------------------------ queries

    def states(self) -> Counter[str]:
        """How many members this one holds in each state (itself not counted)."""
        return Counter(self.member.state_of(i) for i in self.member.table)

    def alive(self) -> list[str]:
        return sorted(self.member.members())

    # ------------------------------------------------------------ output

    def _run(self, now: float, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                addr = a.addr or self.address_of(a.to)
                if not addr:
                    self.unanswerable += 1
                    continue
                self.sent[type(a.msg).__name__] += 1
                self.send(a.to, addr, a.msg)
            elif isinstance(a, Changed):
                self.changes += 1
                if a.member in self.last_change or len(self.last_change) < MAX_CHANGES_KEPT:
                    self.last_change[a.member] = (a.state, now)
                log.debug("%s swim: %s is %s (incarnation %d%s)", self.member.me[:8],
                          a.member[:8], a.state, a.incarnation, ", by me" if a.by_me else "")
