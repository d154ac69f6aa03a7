"""Finding the member that poisons rounds, and leaving it out (sans-IO, part
of RoundCore; the coordinator's side).

A round's mean is checked by every participant (finite, and not far larger
than its own contribution: peer.py); a failed check fails the round for
everyone (all or nothing), so a poisoned mean is never applied. But a ring
all-reduce sums: nobody sees whose contribution it was, and a member that
sends NaN or 1e30 every time would fail every round it takes part in.

The coordinator finds it by group testing under the quorum rule. After a
poisoned round, that round's participants (itself included) are the suspects. Each
following proposal leaves out half of the suspects (as many as the quorum
allows): if the round applies, the culprit was among those left out; if it
is poisoned again, among those kept in. A suspect set of one is excluded for
a cooldown that doubles with repeats (EXCLUDE_FIRST_S up to EXCLUDE_MAX_S):
its Readies are ignored, and the swarm applies rounds without it meanwhile.
A clean round with every suspect in it clears them. So one persistent
poisoner costs about log2(n) failed rounds, then nothing until its cooldown
ends. Assumes the poisoner poisons every round it is in: one that poisons
now and then can get an honest suspect excluded for a cooldown (a bounded
denial of service, docs/swarm.md). A new coordinator starts the search anew.

A member can also stall rounds without poisoning any: it sends Ready (or
repeats an old one) and never acks the proposal, and the coordinator used to
propose it again after every ack timeout, so no round ever committed. A
participant that is heard from after a proposal went out and has not acked
it within the ack timeout, twice in a row, is left out for a cooldown of its own
(`stalled`: two gathers, doubling with repeats up to EXCLUDE_MAX_S; forgiven
when it takes part in a round that applies). Only peers heard after the
proposal are blamed: one that is cut off or dead goes silent, and is the
failure detector's case. An honest peer that refuses a proposal (it
follows another coordinator for a moment, or its state changed) loses one
round's contribution and waits two gathers.

Inside a round, a member can stall its ring: it acks, then never sends (or
never reads), and every participant's transfer waits out the step timeout.
The participant next to the stalled link sees the timeout (one failure
aborts every other link of the ring at once) and names the other end in its
Done (`blame`); the coordinator leaves out both accuser and accused for the
same cooldown (it cannot tell which end stalled). A round with a staller
costs one step timeout, and then the staller is out.
"""

from __future__ import annotations

ACK_MISSES = 2  # proposals in a row a member must let time out to be left out
EXCLUDE_FIRST_S = 60.0
EXCLUDE_MAX_S = 3600.0


class Suspecting:
    """Suspects of poisoned rounds and excluded peers; see rounds.py for the state."""

    def contribution_refused(self, peer: str, now: float) -> None:
        """A robust rule saw `peer`'s own contribution not finite (every
        participant sees every row, so no search is needed): shut it out as a
        traced poisoner. Only a coordinator's exclusions change rounds."""
        if peer != self.me.id:
            self.excluded.add(peer, now)
            self.exclusions += 1

    def excluded_now(self, peer: str, now: float) -> bool:
        return self.excluded.active(peer, now) or self.stalled.active(peer, now)

    def left_out_now(self, now: float) -> set[str]:
        return self.excluded.active_ids(now) | self.stalled.active_ids(now)

    def _blame_link(self, now: float, accuser: str, accused: str, participants) -> None:
        """A participant's Done says its link with `accused` stalled (a
        transfer timed out). Nobody else can tell which end stalled it, so
        both are left out for a while, as BTARD bans accuser and accused: a
        member that accuses honest peers at will pays for each accusation
        with its own place in the next rounds."""
        for p in (accuser, accused):
            if p in participants and p != self.me.id:
                self.stalled.add(p, now)
                self.stall_exclusions += 1

    def _blame_non_ackers(self, now: float, propose, acks: set[str]) -> None:
        """The proposal timed out: leave out, for a while, every participant
        that was heard after it went out and still did not ack it."""
        for p in propose.participants:
            if p in acks:
                self.ack_misses.pop(p, None)
            elif p != self.me.id and self.last_heard.get(p, -1e18) > self.leading.since:
                # Twice in a row: an honest peer can miss one (it was still
                # applying the round before, with more contributions queued).
                self.ack_misses[p] = self.ack_misses.get(p, 0) + 1
                if self.ack_misses[p] >= ACK_MISSES:
                    del self.ack_misses[p]
                    self.stalled.add(p, now)
                    self.stall_exclusions += 1
        self.ack_misses = {p: n for p, n in self.ack_misses.items() if p in propose.participants}

    def _probe(self, ids: list[str]) -> set[str]:
        """Suspects to leave out of the next proposal among `ids`: half of
        those present, fewer if the rest would not be a quorum."""
        present = sorted(set(ids) & self.suspects)
        for k in range(max(1, len(present) // 2), 0, -1):
            probe = set(present[:k])
            if self._quorum(set(ids) - probe):
                return probe
        return set()

    def _learn_from_round(self, now: float, participants, applied: bool,
                          poisoned: bool) -> None:
        """After a round this peer led: narrow the suspects (see the module)."""
        probe, self.probing = self.probing, set()
        if poisoned:
            # Me too: my own contribution may be the bad one (a diverging
            # replica); a coordinator left out of a round still leads it.
            inside = set(participants)
            self.suspects = (self.suspects - probe) & inside if self.suspects else inside
        elif applied:
            self.suspects = probe if probe else self.suspects - set(participants)
            for p in participants:
                self.stalled.forgive(p)
        if len(self.suspects) == 1:
            (culprit,) = self.suspects
            self.excluded.add(culprit, now)
            self.exclusions += 1
            self.suspects = set()
