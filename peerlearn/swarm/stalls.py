"""Saying why a swarm stops applying rounds (the daemon's log), once per
reason and every STALL_LOG_EVERY_S while it lasts. The coordinator knows
why (RoundCore.stall); a lost majority is an ERROR that says what the
operator can do. Loop-owned, like the daemon it is part of."""

from __future__ import annotations

import logging

from peerlearn.swarm.records import RECORD_FILE

log = logging.getLogger("peerlearn.peer")

STALL_LOG_EVERY_S = 30.0
# A stall is logged once no round applied for STALL_ROUNDS times the longest
# of the last few round gaps, and never before STALL_FIRST_S: DiLoCo's rounds
# come every H inner steps (tens of seconds on a busy machine, after a burst
# of quick start-up rounds), and such a gap is the swarm computing, not
# stalling. A lost majority is said after 2 x dead_after regardless.
STALL_ROUNDS = 3.0
STALL_FIRST_S = 60.0


class StallWatch:
    """Mixed into PeerDaemon: needs core, cfg, id, submissions, last_applied_at,
    round_gaps, _stall_logged and _stall_seen."""

    def _watch_stall(self, now: float) -> None:
        """A swarm that stops applying rounds says why, once per reason and
        every STALL_LOG_EVERY_S while it lasts (the coordinator knows why).
        A lost majority is an ERROR that says what the operator can do."""
        if self.core.stall != self._stall_seen and log.isEnabledFor(logging.DEBUG):
            # Every change, for tracing why a round waited or went ahead
            # (the warning below comes only once a stall is long).
            self._stall_seen = self.core.stall
            log.debug("%s round state: %s", self.id[:8], self._stall_seen)
        idle = now - self.last_applied_at
        lost = self.core.unreachable_voters(now) if idle > 2 * self.cfg.timeouts.dead_after \
            else []
        # Nobody wants a round (no contribution here, no Ready heard): the
        # swarm is idle (a lone `--algo local` peer, peers computing), not stalled.
        wanted = bool(self.submissions) or bool(self.core.readies)
        reason = self.core.stall if wanted and idle > self.stall_after() else None
        level = logging.WARNING
        if lost:
            reason, level = self.majority_lost(lost), logging.ERROR
            if all(p in self.core.left for p in lost):
                # They said goodbye (the swarm stopping all at once: nobody
                # stayed to let them leave the view): an ending, not a failure.
                reason, level = (f"the swarm stopped: {len(lost)} of the view's voting members "
                                 "said goodbye; rounds resume when enough of them are back"),\
                    logging.INFO
        if reason is None:
            self._stall_logged = (None, 0.0)
            return
        if reason != self._stall_logged[0] or now - self._stall_logged[1] >= STALL_LOG_EVERY_S:
            self._stall_logged = (reason, now)
            log.log(level, "%s no round applied for %.0f s: %s", self.id[:8],
                    now - self.last_applied_at, reason)

    def stall_after(self) -> float:
        """Seconds without an applied round that count as a stall here."""
        return max(STALL_FIRST_S, STALL_ROUNDS * max(self.round_gaps, default=0.0))

    def majority_lost(self, lost: list[str]) -> str:
        """Why no round can apply while `lost` voters are unreachable, and what to do."""
        voters = len(self.core.voters())
        names = ", ".join(f"{p[:8]} ({self.core.known[p].control})" if p in self.core.known
                          else p[:8] for p in lost)
        return (f"majority lost: {len(lost)} of the view's {voters} voting members are "
                f"unreachable ({names}) and a round needs {voters // 2 + 1}. Start them again "
                f"(they resume from their data dirs). If they are gone for good, stop this peer, "
                f"delete {self.cfg.data_dir / RECORD_FILE} and start it again: it founds a new "
                f"swarm from its checkpoint (step {self.core.step}). Peers that stop with "
                f"Ctrl-C leave the view and never cause this.")
