"""The caller's contributions and their fate, sans-IO.

A caller submits contributions (api.Peer.all_reduce_async); each must end in
exactly one way: applied by a round (its result), or failed (Withdrawn,
StateReplaced, PeerClosed). This module decides which, and when; it takes
events and returns `Settle` decisions, never touches a future, a socket or a
clock, so the rules are unit tests (tests/test_contributions.py) and the
simulator drives the same object (tests/swarm_sim.py).

Rules:
  * Contributions go into rounds one at a time, in submission order: the
    first one leads, and only the leader is offered (Ready) to a round.
  * A round carries the leader it started with, even if the leader changes
    before it ends (it was withdrawn and the next one leads): a round that
    applies settles the contribution it carried, whatever leads by then.
  * A round that ends without applying is retried with the same leader,
    unless the caller withdrew it: then it fails with Withdrawn and the next
    one leads. Unless the round reduced into it in place (large states):
    then it fails with the error the daemon gives (ContributionLost).
  * Withdrawing a queued contribution fails it at once; withdrawing the
    leader while a round carries it only marks it: the round completes for
    everyone's sake (and then applies it, or it fails with Withdrawn).
  * When the swarm replaces our state, every contribution fails (all were
    computed against the state just dropped), the leader too, even if a round
    carries it (that round's apply still runs on our state, to stay in
    parity: the daemon runs it, and nobody is told its result).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")  # the daemon's Submission; the simulator's own tokens


@dataclass(frozen=True)
class Settle(Generic[T]):
    """End contribution `sub`: with `result` if `error` is None, else failed
    with that error (an exception instance the daemon raises to its caller)."""

    sub: T
    result: object = None
    error: BaseException | None = None


class Contributions(Generic[T]):
    def __init__(self):
        self.queue: deque[T] = deque()  # the leader first
        self.withdrawn: set[int] = set()  # id() of contributions the caller gave up
        self.carried: dict[int, T] = {}  # round id -> the contribution it carries
        self.settled = 0  # contributions ended (tests count with it)

    @property
    def leader(self) -> T | None:
        return self.queue[0] if self.queue else None

    def offer(self) -> T | None:
        """The contribution to send Ready with now, or None: the leader,
        unless the caller withdrew it. (The daemon adds its own conditions: a
        state held, no round or sync running.)"""
        lead = self.leader
        return None if lead is None or id(lead) in self.withdrawn else lead

    def submit(self, sub: T) -> bool:
        """Queues sub; True if it leads now (offer it)."""
        self.queue.append(sub)
        return len(self.queue) == 1

    def withdraw(self, sub: T, round_running: bool) -> list[Settle]:
        """The caller gave up on sub. round_running: a round that may carry
        the leader has started and not ended."""
        if sub not in self.queue:
            return []
        if sub is not self.leader or not round_running:
            return self._fail(sub, "withdrawn before its round")
        self.withdrawn.add(id(sub))
        return []

    def round_started(self, round_id: int) -> T | None:
        """A round starts with our offer: it carries the leader (None: we have
        nothing to give, the round fails for us)."""
        lead = self.offer()
        if lead is not None:
            self.carried[round_id] = lead
        return lead

    def round_applied(self, round_id: int, result: object,
                      error: BaseException | None = None) -> list[Settle]:
        """The round applied: the contribution it carried has its result (or
        the error its apply raised) and leaves the queue."""
        sub = self.carried.pop(round_id, None)
        if sub is None or sub not in self.queue:
            return []  # carried nothing, or already failed (StateReplaced)
        self.queue.remove(sub)
        self.withdrawn.discard(id(sub))
        self.settled += 1
        return [Settle(sub, result, error)]

    def round_failed(self, round_id: int) -> list[Settle]:
        """The round ended without applying: the leader goes again, unless
        withdrawn (then it fails and the next one leads)."""
        self.carried.pop(round_id, None)
        lead = self.leader
        if lead is not None and id(lead) in self.withdrawn:
            return self._fail(lead, "withdrawn before its round")
        return []

    def round_spent(self, round_id: int, error: BaseException) -> list[Settle]:
        """The round ended without applying after reducing in place into the
        contribution it carried: that one cannot go again and fails with
        `error` (ContributionLost); the next one leads."""
        sub = self.carried.pop(round_id, None)
        if sub is None or sub not in self.queue:
            return []
        self.queue.remove(sub)
        self.withdrawn.discard(id(sub))
        self.settled += 1
        return [Settle(sub, error=error)]

    def state_replaced(self, error: BaseException) -> list[Settle]:
        """Every contribution fails with `error` (StateReplaced)."""
        return self.fail_all(error)

    def fail_all(self, error: BaseException) -> list[Settle]:
        out = [Settle(s, error=error) for s in self.queue]
        self.settled += len(out)
        self.queue.clear()
        self.withdrawn.clear()
        return out

    def _fail(self, sub: T, why: str) -> list[Settle]:
        from peerlearn.swarm.errors import Withdrawn

        self.queue.remove(sub)
        self.withdrawn.discard(id(sub))
        self.settled += 1
        return [Settle(sub, error=Withdrawn(why))]
