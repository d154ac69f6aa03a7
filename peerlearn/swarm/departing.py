"""Leaving a swarm for good, and whose votes count (sans-IO, part of RoundCore).

A stopping peer says goodbye (Leave). A member that stays answers
(Staying); then the leaver records on disk that it left the view
(`departed`) and says so (Leave with departed): the others drop it from the
view at once, and the quorum shrinks with it. So a two-peer swarm survives
one peer's Ctrl-C, and a three-peer swarm two.

Why it is safe: a departed peer never votes in that view again. It says
`departed` in its heartbeats and Readies until it takes part in an applied
round, and every quorum is a strict majority of the *voters* (the view's
members minus those known to have departed). Each side of a partition
counts every member that can still vote among its voters, so two majorities
always share a peer, whoever heard which goodbye. A peer that gets no
answer (the whole swarm stopping at once) keeps its place, so a restart of
the swarm resumes as before; a killed peer keeps its place too (it may come
back), and a swarm that lost a majority of its voters waits and says so.

`departed_peers` (who left for good -> the last round id it knew) is
bounded: see `_bound_departed`.

RoundCore (rounds.py) mixes this in; the state is RoundCore's.
"""

from __future__ import annotations

from peerlearn.swarm.actions import Send, ViewChanged
from peerlearn.wire import control as m

# Departures remembered at most: as many as a view can hold, so honest
# departures between two applied rounds (each a member leaving) never reach it.
MAX_DEPARTED = m.MAX_MEMBERS


class Departing:
    """Leave, departure and the voter set; see rounds.py for the state."""

    def voters(self) -> set[str]:
        """The view members whose votes count: not the ones that left it for
        good (a Leave with departed, or `departed` in their own words), nor me
        if I did. Every quorum is a strict majority of these. Safe because a
        departed peer never votes in this view again: each side's voters
        include every member that still can, so two majorities intersect."""
        gone = set(self.departed_peers)
        gone |= {i for i, b in self.beats.items() if b.departed}
        gone |= {i for i, r in self.readies.items() if r.departed}
        if self.departed:
            gone.add(self.me.id)
        return set(self.members) - gone

    def _quorum(self, ids) -> bool:
        voters = self.voters()
        return 2 * len(set(ids) & voters) > len(voters)

    @property
    def quorum_needed(self) -> int:
        return len(self.voters()) // 2 + 1

    def unreachable_voters(self, now: float) -> list[str]:
        """Voters this peer cannot hear, when too many for any quorum (else []):
        the swarm cannot apply a round until enough of them come back."""
        voters = self.voters()
        lost = sorted(p for p in voters if not self.alive(p, now))
        return lost if 2 * (len(voters) - len(lost)) <= len(voters) else []

    def leave(self, now: float) -> list:
        """I am stopping: from now on nothing leaves here but what depart()
        returns, and no input but Staying has an effect (the others count me
        dead from this Leave on, so I must decide and apply nothing more).
        Members that stay answer Staying (`stayers`); then the driver records
        `departed` and sends depart(). Without an answer (nobody stays) I keep
        my place in the view, and a restart of the swarm resumes it."""
        self.leaving = True
        self.my_ready = None
        return self._broadcast(m.Leave(False), now)

    def staying_members(self, now: float) -> list[str]:
        """Live voters other than me: those whose Staying lets me depart."""
        return [p for p in sorted(self.voters()) if p != self.me.id and self.alive(p, now)]

    def depart(self, now: float) -> list:
        """A member stays: I leave the view for good. The driver must make
        record() (now departed) durable before it sends what this returns."""
        if not self.stayers:
            return []
        self.departed = True
        self.members.pop(self.me.id, None)
        return self._broadcast(m.Leave(True, self.max_round_id), now)

    def _on_leave(self, now, sender, msg: m.Leave) -> list:
        self.left.add(sender)
        self.readies.pop(sender, None)
        if msg.departed and sender in self.members and len(self.members) > 1:
            # It recorded that it left: it never votes in this view again, so
            # the view (and with it the quorum) shrinks now. The driver writes
            # the smaller view to our record: a restart must not count it.
            self.departed_peers.pop(sender, None)  # to the end: the newest departure
            self.departed_peers[sender] = msg.round_id
            del self.members[sender]
            self._bound_departed()
            return [ViewChanged(self.epoch, tuple(sorted(self.members)))]
        if not msg.departed and sender in self.members and not self.leaving and \
                self.me.id in self.voters():
            return [Send(sender, m.Staying())]
        return []

    def _on_staying(self, now, sender, msg: m.Staying) -> list:
        if self.leaving and sender in self.voters():
            self.stayers.add(sender)
        return []

    def _bound_departed(self) -> None:
        """Keep departed_peers small. It grows here only, by one per member
        that leaves for good, so it is bounded here.

        What an entry does: a departed peer p is out of `members` from its
        Leave on, and the entry only matters if p re-enters `members` without
        coming back: through a round committed before its Leave and applied
        after (_settle drops p from a round whose id is at most the entry), or
        a Welcome's view naming it (voters() leaves it out). Both need a round
        id at most the entry applied or taken here, while round ids applied
        here only grow and a Welcome must be newer than our epoch: so once
        the entry is below our epoch and p is out of the view, a view naming
        p comes from a round p really took part in after leaving (it came
        back, as a restarted peer does), and the entry is inert: dropped.

        Past MAX_DEPARTED the oldest departures go, those outside the view
        first. Dropping any entry is safe for the quorum rule: at worst p
        counts as a voter again, and a departed peer never votes (its own
        heartbeats and Readies say departed until it applies a round), so a
        quorum is still a strict majority of a superset of the peers that
        vote, and two such majorities still share a voting peer (departing
        can only shrink the voters, which is what needs care). What it costs
        is liveness: a dead p counted again makes the quorum larger, and a
        small swarm may wait for it. That takes a round committed before p
        left applied here after MAX_DEPARTED later departures and before any
        later round: more members leaving than a view holds, in one round's
        time. A member that lies in its Leave (a round id past every round)
        keeps its own entry forever, one per identity that entered the view
        through a round, until later departures push it out.
        """
        for p in [p for p, r in self.departed_peers.items()
                  if r < self.epoch and p not in self.members]:
            del self.departed_peers[p]
        excess = len(self.departed_peers) - MAX_DEPARTED
        if excess > 0:
            # sorted() is stable: oldest first (insertion order) within each group.
            for p in sorted(self.departed_peers, key=lambda q: q in self.members)[:excess]:
                del self.departed_peers[p]
