"""Coordinators that stall (sans-IO, part of RoundCore).

The live voter with the smallest id leads, and ids are hashes of keys: a
member holding the secret can mint identities until one sorts first, then
lead without leading. It proposes nothing, or commits a round and never
decides it, and no round runs for as long as it lives (its heartbeats keep
it alive, so the failure detector never moves on).

What a leader must do is visible to every member alike: Readies, Commits and
decisions are broadcast to the view. So each peer, the leader included,
judges the leader by the same evidence:

  * a quorum of voters has been ready on the newest state for `patience`
    (two gathers, two ack timeouts and one dead_after: an honest leader
    waits at most a gather for stragglers, once more for a catching-up
    joiner, and re-proposes after an ack timeout) and no round was
    committed meanwhile; or
  * a committed round stayed undecided for `patience` after the last of
    its participants' Dones (each participant sends its Done to every
    member, so all see the same), or for the collective timeout plus
    `patience` when some Done never came (an honest leader aborts at the
    collective timeout).

Then the leader is deposed: it leads nothing for a cooldown (four
patiences, doubling with repeats up to LEAD_MAX_S), the next smallest live
voter leads and finishes any round left undecided (adoption, as for a dead
leader). An honest leader that sees the same evidence deposes itself, so the
view does not split over who leads; where peers judged at different moments
(one restarted meanwhile), each heartbeat carries the leader its sender's
own evidence picks and every peer follows the most chosen (ties to the
smallest id), and the next leader gets two patiences before it is judged.
A leader that stalls for ever costs one patience per cooldown. RoundCore
(rounds.py) mixes this in; the state is RoundCore's.
"""

from __future__ import annotations

LEAD_MAX_S = 3600.0


class Deposing:
    """Deposition of stalling leaders; see rounds.py for the state."""

    def patience(self) -> float:
        return 2 * self.t.gather + 2 * self.t.ack + self.t.dead_after

    def _check_leader(self, now: float) -> None:
        if self.me.id not in self.members or not self.synced:
            self.quorum_ready_since = None
            return
        c = self.observed
        if c is not None:
            self.quorum_ready_since = None
            done = self.all_done_at if self.dones_round == c.round_id else None
            since, bound = (done, self.patience()) if done is not None else \
                (self.observed_at, self.t.collective + self.patience())
            if self.committer is not None and now - since > bound:
                self._depose(self.committer, now)
                # The successor gets its own time to end it.
                self.observed_at, self.all_done_at = now, None
            return
        ready = self._quorum_ready(now)
        if ready is None or ready != self.quorum_ready_on or self.quorum_ready_since is None:
            self.quorum_ready_on = ready
            self.quorum_ready_since = now if ready is not None else None
            return
        if now - self.quorum_ready_since > self.patience():
            lead = self.coordinator(now)
            if lead is not None:
                self._depose(lead, now)
            # The next leader gets two patiences: peers that judged the last
            # one a little later follow it only then.
            self.quorum_ready_since = now + self.patience()

    def _saw_done(self, now: float, sender: str, msg) -> None:
        """Participants send their Done to every member: count them for the
        round we observe, and note when the last one came."""
        c = self.observed
        if c is None or msg.round_id != c.round_id or sender not in c.participants:
            return
        if self.dones_round != c.round_id:
            self.dones_round, self.dones_from, self.all_done_at = c.round_id, set(), None
        self.dones_from.add(sender)
        if self.all_done_at is None and self.dones_from >= set(c.participants):
            self.all_done_at = now

    def _quorum_ready(self, now: float) -> tuple[int, bytes] | None:
        """The newest (step, hash) a quorum of voters is ready on, if any."""
        groups: dict[tuple[int, bytes], set[str]] = {}
        for i, r in self.readies.items():
            if self.alive(i, now) and self.trusted(i, now):
                groups.setdefault((r.step, r.state_hash), set()).add(i)
        newest = self.newest_step(now)
        held = [k for k, v in groups.items() if k[0] == newest and self._quorum(v)]
        return max(held, key=lambda k: k[1]) if held else None

    def _most_followed(self, now: float, candidates: list[str]) -> str | None:
        """Among the live voters that may lead, the one most live voters
        choose (their heartbeats carry their own choice, not whom they end up
        following: else a deposed leader's votes would keep it for ever),
        ties to the smallest id. Peers that judged a leader at
        different moments (one restarted meanwhile) otherwise split, each
        side proposing rounds the other refuses. A deposition takes effect
        when a majority of the voters have seen the evidence; one liar's
        heartbeat is one vote."""
        if not candidates:
            return None
        votes = {self._my_choice(now, candidates): 1}
        for i in self.voters():
            b = self.beats.get(i)
            if i != self.me.id and b is not None and b.leader in candidates and \
                    self.alive(i, now) and self.trusted(i, now):
                votes[b.leader] = votes.get(b.leader, 0) + 1
        return min(votes, key=lambda p: (-votes[p], p))

    def _my_choice(self, now: float, candidates: list[str]) -> str | None:
        """The leader my own evidence picks (what my heartbeats say): the
        smallest I have not deposed, or the smallest if I deposed them all."""
        if not candidates:
            return None
        return min([p for p in candidates if not self.deposed.active(p, now)] or candidates)

    def _depose(self, leader: str, now: float) -> None:
        self.deposed.add(leader, now)
        self.depositions += 1
        if leader == self.me.id:
            self.leading = None
