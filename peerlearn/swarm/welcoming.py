"""Taking a view from a Welcome, and which peers we keep track of (sans-IO,
part of RoundCore).

A joiner takes the view of the member it asked. A member whose view is out
of date (a member's heartbeat shows later rounds) asks that member and takes
its answer only under the rules below: an attacker holding the secret must
not be able to widen our view with ids nobody runs, move our round ids to the
end of their space, or name itself the whole swarm.

Every id a message names costs entries in the per-peer tables (known,
last_heard, beats, beat_at, readies, left) and a heartbeat from us each
period, and a member holding the secret mints ids at will (a Join or a
heartbeat each). So an id is admitted once, into `seen` (the registry the
tables' keys come from: id -> when last heard or named), and once `seen`
holds MAX_KNOWN ids besides the view's a new one outside the view is refused
and counted (`refused_unknown`), its message dropped unread. Ids outside
the view go after 10 x dead_after of silence, or after dead_after (dead to
the detector) while the table is full, so a burst of ids that then fall
silent shuts newcomers out for dead_after, not ten times that; ids kept
alive hold their places, and newcomers wait (refusing them, rather than
evicting live ones, keeps a joiner in the middle of its sync from being
pushed out by a flood). View members are never dropped nor refused: the
quorum and the coordinator are theirs, and a view holds at most
m.MAX_MEMBERS of them.

RoundCore (rounds.py) mixes this in; the state is RoundCore's.
"""

from __future__ import annotations

from peerlearn.swarm.actions import Send, ViewChanged
from peerlearn.swarm.coordinating import ROUND_ID_LIMIT
from peerlearn.wire import control as m

MAX_EPOCH_JUMP = 1 << 20  # rounds a Welcome may move our view on by at once
# Ids outside the view the tables hold at most: joiners, peers that left it,
# peers we heard of. Four times a large view (256); the wire's largest view
# (m.MAX_MEMBERS) fits beside it, members being on top of this.
MAX_KNOWN = 1024
# Members of a view we asked for that we never heard, told who we are per
# Welcome (Welcoming._introduce).
MAX_INTRODUCTIONS = 8


class Welcoming:
    """Welcome handling; see rounds.py for the state."""

    def _from_join_target(self, sender: str, msg: m.Welcome) -> bool:
        t = self.join_target
        return t is None or sender == t or any(
            p.id == sender and p.control == t for p in msg.members)

    def _on_welcome(self, now, sender, msg: m.Welcome) -> list:
        if self.members:
            # Only the answer to our own Join replaces our view, only a newer
            # view, and only one that keeps a majority of ours or that a
            # majority of its own members vouch for (their heartbeats to us
            # show that epoch): a view that shrank over several rounds need not
            # hold a majority of our old one. An unsolicited Welcome, or a
            # member naming itself the whole swarm, is dropped. So is one
            # naming peers we never heard (ids nobody runs would make the
            # quorum unreachable), or an epoch more than MAX_EPOCH_JUMP past
            # ours (a liar would push our round ids to the end of their space:
            # 2^42 such pushes before it, a million rounds missed is legit).
            asked = sender == self.view_asked_of and \
                now - self.view_asked_at <= self.t.dead_after
            unheard = [p.id for p in msg.members if p.id not in self.members
                       and p.id not in (sender, self.me.id) and not self.alive(p.id, now)]
            # A newer view never holds us (its round ran without us: we would
            # have applied it), and it makes us a joiner, who enters through a
            # round. When a majority of our view's members (departed ones too)
            # report later rounds, our view is stale beyond doubt (one liar is
            # not a majority), and we take such a view even if it holds no
            # majority of ours and none to vouch: one that shrank through
            # departures to a single member cannot offer either.
            without_us = self.me.id not in {p.id for p in msg.members}
            moved_on = [i for i in self.members if i != self.me.id and i in self.beats
                        and self.alive(i, now) and self.epoch < self.beats[i].epoch]
            stale = 2 * len(moved_on) > len(self.members)
            backed = self._quorum(p.id for p in msg.members) or self._vouched(msg, sender, now)
            if not asked or unheard or msg.epoch - self.epoch > MAX_EPOCH_JUMP or not (
                    backed or (without_us and stale)):
                self.rejected += 1
                if asked and unheard and msg.epoch - self.epoch <= MAX_EPOCH_JUMP and (
                        backed or (without_us and stale)):
                    return self._introduce(now, msg, unheard)
                return []
            if msg.epoch > self.epoch and self.observed is None:
                self.view_asked_of = None
                self.members = {p.id: p for p in msg.members}
                for p in msg.members:
                    self._admit(p.id, now)  # a member: always
                    self.known.setdefault(p.id, p)
                self.epoch = msg.epoch
                # That round applied without me: its state may be held by
                # few for a while (settling._finishes_my_round).
                self.unsettled_round = msg.epoch
                self.leading = None
                return [ViewChanged(self.epoch, tuple(sorted(self.members)))]
            return []
        if msg.epoch >= ROUND_ID_LIMIT or not self._from_join_target(sender, msg):
            self.rejected += 1  # joining: only the member we asked answers, with a real view
            return []
        view, epoch = msg.members, msg.epoch
        if msg.epoch < self.epoch and self.recorded_view:
            # Our record shows a later view than the contact's (it was cut off
            # while we applied rounds): taking its view would forget ours, and
            # with it the coordinator our view's members follow.
            view, epoch = self.recorded_view, self.epoch
        self.members = {p.id: p for p in view}
        for p in msg.members + view:
            if self._admit(p.id, now):
                self.known.setdefault(p.id, p)
                self.last_heard.setdefault(p.id, now)  # presumed alive until proven silent
        self.join_target = None
        self.epoch = epoch
        # Every member must know us to send us heartbeats: the parity check
        # that tells us what to sync needs a majority of them.
        return [Send(i, m.Join(self.me, introduce=True))
                for i in sorted({p.id for p in msg.members + view})
                if i not in (sender, self.me.id)]

    def _introduce(self, now: float, msg: m.Welcome, unheard: list[str]) -> list:
        """A view we would take but for members we never heard: they do not
        know us (we joined through another member just before they entered,
        and our first view lacks them), so they will never heartbeat us and
        the view would be refused for ever; the one among them that leads
        would never send us a Commit (a joiner synced 40 steps in a row and
        never entered). Tell a few of them who we are (a Join: they answer,
        and heartbeat us from then on); the next Welcome is then taken. A
        member inventing ids costs us at most MAX_INTRODUCTIONS Joins per
        view we asked for."""
        out = []
        for p in msg.members:
            if p.id in unheard[:MAX_INTRODUCTIONS] and self._admit(p.id, now):
                self.known.setdefault(p.id, p)
                out.append(Send(p.id, m.Join(self.me, introduce=True)))
        return out

    def _vouched(self, msg: m.Welcome, sender: str, now: float) -> bool:
        """A majority of the new view, counting the sender and at least one
        other member, reports (in its own authenticated heartbeats) an epoch
        at least the Welcome's."""
        others = [p.id for p in msg.members if p.id != sender and self.alive(p.id, now)
                  and p.id in self.beats and self.beats[p.id].epoch >= msg.epoch]
        return bool(others) and 2 * (len(others) + 1) > len(msg.members)

    # ---------------------------------------------------------- the tables' bound

    def _admit(self, peer: str, now: float) -> bool:
        """May `peer` have entries in the per-peer tables? Yes if it has some
        already, if it is a view member, or if we asked it for a view; else
        only while `seen` holds fewer than MAX_KNOWN ids besides the view's
        (checked in O(1) as a total of MAX_KNOWN + the view's size: a member
        we never heard is not in `seen`, so its place may go to an outsider)."""
        if peer in self.seen or peer == self.me.id:
            return True
        if peer not in self.members and peer not in (self.join_target, self.view_asked_of) \
                and self._table_full():
            self.refused_unknown += 1
            return False
        self.seen[peer] = now
        return True

    def _table_full(self) -> bool:
        """MAX_KNOWN ids besides the view's (me aside: never in `seen`)."""
        return len(self.seen) >= MAX_KNOWN + len(self.members) - (self.me.id in self.members)

    def _pinned(self) -> set[str]:
        """Ids kept however silent: the view, and whoever a round or a join
        in progress here still names (a Commit is built from `known`)."""
        keep = set(self.members) | {self.committer, self.acked_to, self.join_target,
                                    self.view_asked_of}
        if self.leading is not None:
            keep.update(self.leading.propose.participants)
        if self.observed is not None:
            keep.update(self.observed.participants)
        return keep

    def _forget_long_gone(self, now: float) -> None:
        """Drop every entry of ids outside the view silent for 10 x dead_after,
        or dead_after when the table is full. Runs once a heartbeat period:
        the sweep is linear in the table."""
        if now - self.swept_at < self.t.heartbeat_every:
            return
        self.swept_at = now
        # Members we never heard (a view taken from a Welcome or our record)
        # start ageing once they are out of the view.
        for p in self.known:
            if p not in self.seen and p not in self.members and p != self.me.id:
                self.seen[p] = now
        horizon = self.t.dead_after if self._table_full() else 10 * self.t.dead_after
        keep = self._pinned()
        gone = [p for p, t in self.seen.items() if p not in keep and now - t > horizon]
        for p in gone:
            for d in (self.seen, self.last_heard, self.known, self.beats, self.beat_at,
                      self.readies):
                d.pop(p, None)
            self.left.discard(p)
            self.waited_once.discard(p)
