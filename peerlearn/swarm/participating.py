"""The participant's half of the round protocol (sans-IO, part of RoundCore).

A participant takes a round the coordinator proposes, or commits at once
(a fast Commit: coordinating._repeats_last_round), only for its own state,
only from whom it follows, only in increasing (id, term), and only one at a
time; it starts the collective on the Commit and settles on Apply or Abort
(settling.py). Coordinating is the other half; the state is RoundCore's
(rounds.py).
"""

from __future__ import annotations

from peerlearn.swarm.actions import ZERO_HASH, Send, StartCollective
from peerlearn.wire import control as m


class Participating:
    """Participant handlers of RoundCore; see rounds.py for the state they use."""

    def _on_propose(self, now, sender, msg: m.Propose) -> list:
        may = self._may_ack(now, sender, msg)
        if may is None:
            self.rejected += 1
        if not may:
            return []  # refused, or not my state now: the proposal times out
        self._ack(sender, msg)
        ack = m.Ack(msg.round_id, msg.term)
        return [Send(sender, ack)] if sender != self.me.id else self.receive(now, sender, ack)

    def _may_ack(self, now, sender, msg: m.Propose | m.Commit) -> bool | None:
        """Whether I take part in the round msg proposes (a Propose, or a
        fast Commit: the same rule): None if the message has no standing
        (not from whom I follow, an old term or id, a view out of date),
        False if it has but the round is not for my state now."""
        stale = (sender != self.me.id and msg.round_id <= self.max_round_id) or \
            self.view_behind(now) is not None  # an id in use, or our view is out of date
        if self.leaving or sender != self.coordinator(now) or msg.term < self.term or stale or \
                (msg.round_id, msg.term) <= self.acked or self.me.id not in msg.participants:
            return None
        # Not my state, still finishing a round, or a step the swarm has
        # passed (I restarted from an older checkpoint and sync first).
        return (msg.step, msg.state_hash) == (self.step, self.state_hash) and \
            self.active is None and self.sync_requested is None and \
            msg.step >= self.newest_step(now)

    def _ack(self, sender: str, msg: m.Propose | m.Commit) -> None:
        """I take part in msg's round: no older term or id from now on."""
        self.term = msg.term
        self.max_round_id = max(self.max_round_id, msg.round_id)
        self.acked = (msg.round_id, msg.term)
        self.acked_to = sender

    def _on_commit(self, now, sender, msg: m.Commit) -> list:
        # The Commit for the proposal we acked is taken from the peer we acked,
        # even if our detector has meanwhile changed its mind about who leads:
        # refusing it would leave the others waiting for us in the collective.
        if self.observed is not None and self.observed.round_id == msg.round_id and \
                sender == self.committer:
            return []  # sent again for a participant that lost it: we have it
        mine = self.acked == (msg.round_id, msg.term) and sender == self.acked_to
        if msg.fast and not mine and sender != self.me.id and self.me.id in msg.participants \
                and sender == self.coordinator(now):
            # No Propose came before it: take it as one (a copy a member
            # forwards to us as leader goes on below). A refusal is answered
            # at once with a failed Done, so the round aborts in one hop
            # instead of every other participant's collective timing out.
            if not self._may_ack(now, sender, msg):
                self.rejected += 1
                no = m.Done(msg.round_id, False, ZERO_HASH)
                return [Send(sender, no)]
            self._ack(sender, msg)
            mine = True
        if sender != self.coordinator(now) and not mine and self._forwarded(now, sender, msg):
            return []  # a round we lead but never saw (we restarted): adopted at the next tick
        if (sender != self.coordinator(now) and not mine) or msg.term < self.term:
            self.rejected += 1
            return []
        out: list = []
        if self.observed is not None and msg.round_id > self.observed.round_id:
            # A later round was committed, so the one we hold was settled (or
            # never known) by whoever leads: it did not apply with us. Drop it;
            # the parity check syncs whatever the swarm applied.
            out = self._settle(now, self.me.id, self.observed.round_id, apply=False)
        self.max_round_id = max(self.max_round_id, msg.round_id)
        self.term = max(self.term, msg.term)
        for p in msg.members:
            if self._admit(p.id, now):  # else known again from its view, if it applies
                self.known.setdefault(p.id, p)
        self.committer = sender
        self.observed_at = now
        if self.me.id not in msg.participants:
            self.observed = msg
            return out
        if self.acked != (msg.round_id, msg.term):
            self.rejected += 1
            return out
        self.observed = self.active = self.took_part = msg
        self.my_done = None
        return out + [StartCollective(msg.round_id, msg.step, msg.participants, msg.members)]

    def _on_apply(self, now, sender, msg: m.Apply) -> list:
        return self._settle(now, sender, msg.round_id, apply=True)

    def _on_abort(self, now, sender, msg: m.Abort) -> list:
        return self._settle(now, sender, msg.round_id, apply=False)
