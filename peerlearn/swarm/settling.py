"""How a participant settles: committed rounds, and its state (sans-IO, part
of RoundCore).

A round's decision (Apply or Abort) is sent once. A participant that missed
it, or whose leader restarted and never knew the round, must still settle it,
or it holds the round open forever and withholds its quorum vote. These are
the rules it settles by, from the evidence it has: the decider's message, or
view members' heartbeats (epoch = last applied round, aborted = last settled
as aborted, term = highest id known).

The parity check settles the state: a peer behind the newest state a live
member holds, or off the majority's hash, fetches it; a peer restarted below
the step it recorded fetches exactly that recorded state from whoever holds
it. RoundCore (rounds.py) mixes this in; the state is RoundCore's.
"""

from __future__ import annotations

from peerlearn.swarm.actions import ApplyResult, DiscardResult, SyncNeeded, ViewChanged
from peerlearn.swarm.coordinating import ROUND_ID_LIMIT
from peerlearn.wire import control as m

MAX_UNBELIEVED = 1024  # (announcer, step, hash) claims remembered as counted


class Settling:
    """Participant-side settlement of rounds and state; see rounds.py for the state."""

    def _outcome_seen(self, round_id: int) -> bool | None:
        """How round_id ended, as view members' heartbeats tell: True applied,
        False aborted or superseded (a later round was decided, so this one
        was too; its result can be dropped: the parity check syncs what the
        swarm applied), None not known yet.

        Only members' reports count, and only of rounds known to have been
        committed (ids up to max_round_id): a report of round 2^64-1 names
        no round and proves nothing.
        """
        beats = [b for i, b in self.beats.items() if i in self.members and i != self.me.id]
        if any(b.epoch == round_id for b in beats):
            return True
        if any(round_id <= b.aborted <= self.max_round_id or
               round_id < b.epoch <= self.max_round_id for b in beats):
            return False
        return None

    def _learn_missed_decision(self, now: float) -> list:
        """A decision is sent once; one that was missed (the decider died while
        sending it, or we still believed its predecessor alive and refused it)
        must not hold the round open here forever, and with it our quorum vote."""
        c = self.observed
        if c is None or (self.leading is not None and self.leading.commit is c):
            return []
        outcome = self._outcome_seen(c.round_id)
        if outcome is None and self._leader_never_knew(c, now):
            outcome = False
        if outcome is None:
            return []
        return self._settle(now, self.me.id, c.round_id, apply=outcome)

    def _leader_never_knew(self, c: m.Commit, now: float) -> bool:
        """Whoever leads now has a heartbeat showing no round as late as c: it
        restarted (perhaps it is c's own committer, its counters back at zero)
        or came back after c was committed without it. Nobody will ever decide
        c, so it did not apply with us. Had its committer applied it alone
        before dying, dropping it here only costs a state sync, never a second
        hash for the step. (A member's heartbeats and Commits travel in order
        on one connection: the committer's beat received after its Commit
        was sent after it, so it knows the round unless it restarted.)"""
        coord = self.coordinator(now)
        if coord in (None, self.me.id):
            return False
        b = self.beats.get(coord)
        # Only a beat sent after the Commit reached us says what the leader knows now.
        fresh = self.beat_at.get(coord, -1e18) > self.observed_at
        return b is not None and fresh and b.term < c.round_id and b.epoch < c.round_id

    def _forwarded(self, now: float, sender: str, msg: m.Commit) -> bool:
        """A member hands us, the coordinator, a committed round we know nothing
        of (we restarted after committing it; or its committer left, and its
        Commit reached us after its Leave): we adopt it, so it is settled
        rather than held open forever. A proposal of ours still waiting for
        acks gives way: the member holding the round would never ack it."""
        if not (self.is_coordinator(now) and sender in self.members and self.observed is None
                and (self.leading is None or self.leading.commit is None)
                and self.epoch < msg.round_id < ROUND_ID_LIMIT and self.aborted < msg.round_id):
            return False
        self.leading = None
        self.observed, self.observed_at, self.committer = msg, now, self.me.id
        self.max_round_id = max(self.max_round_id, msg.round_id)
        return True

    def _settle(self, now: float, sender: str, round_id: int, apply: bool) -> list:
        c = self.observed
        if c is None or c.round_id != round_id:
            return []
        if sender not in (self.me.id, self.committer, self.coordinator(now)):
            self.rejected += 1
            return []
        mine = self.active is not None
        self.observed = self.active = self.my_done = None
        if mine:
            self.my_ready = None  # the round took it; the driver sends the next
        self.first_ready_at = None
        for i in c.participants:
            if i in self.readies and self.readies[i].step <= c.step:
                del self.readies[i]
        if self.unsettled_round is not None and round_id >= self.unsettled_round:
            self.unsettled_round = None
        if not apply:
            self.aborted = max(self.aborted, round_id)
            return [DiscardResult(round_id)] if mine else []
        self.epoch = round_id
        if not mine:
            # Applied without me (I was left out, or had dropped it): its
            # participants' state is the next one, even while few announce it.
            self.unsettled_round = round_id
        # The view is the round's participants: a Commit naming others (a
        # coordinator holding the secret lying) would put ids nobody runs in
        # every view, and the quorum out of reach for good. A participant that
        # left for good after this round was committed (its Leave came first)
        # does not come back with it.
        took_part = set(c.participants)
        self.members = {p.id: p for p in c.members if p.id in took_part
                        and c.round_id > self.departed_peers.get(p.id, -1)}
        if self.me.id in self.members:
            self.departed = False  # back in a view through a round: my vote counts again
        self.waited_once -= set(self.members)  # one that leaves and comes back: waited for again
        # Members, and peers left out of this view whose Readies still come
        # (a slow one, which the next rounds should wait for): ids `seen` holds.
        self.lateness = {p: v for p, v in self.lateness.items()
                         if p in self.members or p in self.seen}
        # Every participant finished the round moments ago (the Apply says so):
        # count that as hearing from them. A peer that joined the view through
        # this round may not have heartbeated us yet, and the next round must
        # wait for it rather than go ahead without a member it never heard.
        for p in c.participants:
            if p != self.me.id and self._admit(p, now):
                self.last_heard[p] = max(now, self.last_heard.get(p, now))
                self.seen[p] = max(now, self.seen.get(p, now))
        for p in self.members.values():
            # A member's address: the Commit's names were refused if the table was full.
            self._admit(p.id, now)
            self.known.setdefault(p.id, p)
        out: list = [ViewChanged(self.epoch, c.participants)]
        if mine:
            # step and state_hash move together, in result_applied: the driver
            # may apply off its loop, and a heartbeat meanwhile must not pair
            # the new step with the old hash.
            out.insert(0, ApplyResult(round_id, c.step))
            self.applying = c.step + 1
        return out

    # ---------------------------------------------------------- parity

    def newest_step(self, now: float) -> int:
        """The highest step a live view member holds (synced), mine included,
        among the states believed (settling._backed: mine, or announced by a
        majority of the other voters).

        Every such state was applied by an agreed round (or restored from a
        checkpoint of one), so no round may run for a lower step: that step
        was passed, and running it again would give it a second hash. A step
        only a minority announces is not believed: one liar announcing a far
        step would otherwise stall every round for as long as it lives.
        """
        claims: dict[tuple[int, bytes], set[str]] = {}
        for i, b in self._member_beats(now).items():
            if b.synced:
                claims.setdefault((b.step, b.state_hash), set()).add(i)
        for i, r in self.readies.items():
            if self.trusted(i, now) and i in self.members and i != self.me.id and \
                    self.alive(i, now):
                claims.setdefault((r.step, r.state_hash), set()).add(i)
        steps = [k[0] for k, v in claims.items() if self._backed(k, v, now)]
        if self.synced:
            steps.append(self.step)
        return max(steps + [self.floor])

    def _beyond_belief(self, peer: str, newest: int) -> bool:
        b = self.beats.get(peer)
        return peer != self.me.id and b is not None and b.synced and b.step > newest

    def _check_sync(self, now: float) -> list:
        """Parity: if a majority of the view holds a state I do not, fetch it."""
        if self.active is not None or self.applying is not None:
            return []  # (applying: the others are where my apply is taking me)
        if self.epoch == 0 and set(self.members) <= {self.me.id}:
            return self._resume_newest(now)
        views: dict[tuple[int, bytes], list[str]] = {}
        for i, b in self._member_beats(now).items():
            if b.synced:
                views.setdefault((b.step, b.state_hash), []).append(i)
        if self.synced and self.me.id in self.members:
            views.setdefault((self.step, self.state_hash), []).append(self.me.id)
        if self.step < self.floor and max((st for st, _ in views), default=-1) < self.floor:
            # I restarted below the step I reached and no live member holds it
            # (the view was all restarted, or only a peer outside it synced it):
            # that exact state, whoever holds it, is mine again.
            out = self._back_to_floor(now)
            if out or self.sync_requested == (self.floor, self.floor_hash):
                return out
        # A state I do not hold counts only when enough voters announce it
        # (_backed): one member announcing a far step with a finite but wrong
        # state under its own hash used to have every peer install it.
        believed = {k: v for k, v in views.items() if self._backed(k, v, now)}
        self._count_unbelieved(views, believed)
        views = believed
        if not views:
            return []
        newest = max(st for st, _ in views)
        if newest > self.step or not self.synced:
            # A newer backed state wins even when it is not ours: it was applied
            # by an agreed round, and the step we hold has been passed for good.
            best = [(k, v) for k, v in views.items() if k[0] == newest]
        else:
            # Same step, another hash: the majority's state repairs ours.
            best = [(k, v) for k, v in views.items() if k[0] == self.step and self._quorum(v)]
        if not best:
            return []
        (step, h), donors = max(best, key=lambda kv: (len(kv[1]), kv[0][1]))
        if (step, h) == (self.step, self.state_hash) and self.synced:
            return []
        if step < self.step or self.sync_requested == (step, h):
            return []
        self.sync_requested = (step, h)
        return [SyncNeeded(step, h, tuple(sorted(d for d in donors if d != self.me.id)))]

    def _backed(self, claim: tuple[int, bytes], holders, now: float) -> bool:
        """May this (step, hash), announced by `holders`, be believed: mine
        (held, or reached before I restarted), announced by a strict majority
        of the other voters of my view, or the outcome of a round I know of
        and lack (_finishes_my_round).

        Every round that applies is run by a quorum (a strict majority of the
        voters) holding one state, and each participant applies it, so the
        state a round produced is soon announced by a majority of the voters
        other than any one peer left out of it. Fewer than half the voters
        dishonest can never back a state by themselves, however far a step
        they announce. A state only a minority holds without explanation
        (its other holders died before they applied) is adopted once they
        restart and fetch it back by their own records (_back_to_floor)."""
        holders = set(holders)
        if self.me.id in holders or claim == (self.floor, self.floor_hash):
            return True  # mine, or the one my record says I reached
        others = self.voters() - {self.me.id}
        if others and 2 * len(holders & others) > len(others):
            return True
        return self._finishes_my_round(claim, holders)

    def _count_unbelieved(self, views: dict, believed: dict) -> None:
        """Count each (announcer, step, hash) not believed once, the newer
        states only (an older one is the announcer behind, not a claim)."""
        for k, holders in views.items():
            if k in believed or k[0] <= self.step:
                continue
            for i in holders:
                if (i, k) not in self.unbelieved:
                    if len(self.unbelieved) >= MAX_UNBELIEVED:
                        self.unbelieved.clear()  # a bound, not a history: recount at worst
                    self.unbelieved.add((i, k))
                    self.unbacked_states += 1

    def _finishes_my_round(self, claim: tuple[int, bytes], holders) -> bool:
        """Round `unsettled_round` applied without my result (I was left out
        of it, or dropped it), or I restarted after taking part in it and
        never learned how it ended: a member announcing the step after the
        newest I reached, with that round as its last applied one, holds its
        outcome. Without this, a round that only its committer applied (the
        others dropped it, or were killed first) left the swarm waiting for
        ever on one peer's state. A liar among that round's participants can
        at most have me fetch a wrong state for that one step, which the
        majority's hash repairs (_check_sync's same-step rule) before any
        round takes it: it is never backed."""
        if self.unsettled_round is None or claim[0] != self.floor + 1:
            return False
        return any(self.beats[i].epoch == self.unsettled_round for i in holders
                   if i in self.beats and i in self.members)

    def _resume_newest(self, now: float) -> list:
        """A founder that has applied nothing yet (a swarm restarting from its
        checkpoints) adopts the newest state any synced peer brings, so the
        swarm resumes from the newest step its peers hold, not the founder's."""
        newer: dict[tuple[int, bytes], list[str]] = {}
        for i, b in self.beats.items():
            if self.alive(i, now) and self.trusted(i, now) and b.synced and b.step > self.step:
                newer.setdefault((b.step, b.state_hash), []).append(i)
        if not newer:
            return []
        (step, h), donors = max(newer.items(), key=lambda kv: (kv[0][0], len(kv[1]), kv[0][1]))
        if self.sync_requested == (step, h):
            return []
        self.sync_requested = (step, h)
        return [SyncNeeded(step, h, tuple(sorted(donors)))]

    def _back_to_floor(self, now: float) -> list:
        """Fetch the state my record says I reached (step floor, hash
        floor_hash) from any live peer announcing exactly it, view member or
        not: it is on the one history (I applied it), and the hash I check it
        against is my own. Without this a view whose members all restarted
        below the newest step waited forever beside a joiner that held it."""
        if self.floor_hash is None:
            return []
        want = (self.floor, self.floor_hash)
        donors = sorted(i for i, b in self.beats.items() if i != self.me.id and
                        self.trusted(i, now) and
                        self.alive(i, now) and b.synced and (b.step, b.state_hash) == want)
        if not donors or self.sync_requested == want:
            return []
        self.sync_requested = want
        return [SyncNeeded(*want, tuple(donors))]
