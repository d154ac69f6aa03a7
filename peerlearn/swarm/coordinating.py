"""The coordinator's half of the round protocol (sans-IO, part of RoundCore).

The live view member with the smallest id leads: it proposes a round among
the peers ready on the newest state a majority holds, commits once every one
of them acked (or commits at once when the round repeats the last one it
led: the same participants at the next step, `_repeats_last_round`), and
decides Apply (every Done ok with one result hash) or Abort. It also
finishes a round committed by a predecessor that died (adoption), and keeps
deciding a round it committed even after a smaller id comes back.
Participating (participating.py) is the other half; RoundCore (rounds.py)
mixes both in, and the state is RoundCore's.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerlearn.swarm.actions import ZERO_HASH, Send
from peerlearn.wire import control as m

# No honest swarm reaches 2^62 rounds; reports above it are a member's lie.
ROUND_ID_LIMIT = 1 << 62
CATCHUP_EVERY = 10
# A gather waits for a joiner still fetching the state until it is ready, at
# most this many gathers (its sync and first contribution can take longer
# than GATHER_MAX_FACTOR gathers at GB sizes); and such waits take at most
# 1 / (CATCHUP_EVERY + 1) of the time (see _maybe_propose).
CATCHUP_MAX_FACTOR = 12.0
# A round waits for a member up to its measured lateness times this margin,
# and never more than this many gathers.
LATENESS_MARGIN = 1.25
GATHER_MAX_FACTOR = 4.0
LATENESS_DECAY = 0.8  # per new Ready: how fast a member's measured lateness fades
LED_REMEMBERED = 4  # rounds I committed whose late accusations are still heard


@dataclass
class _Round:
    """A round this peer coordinates."""

    propose: m.Propose
    since: float
    acks: set[str]
    commit: m.Commit | None = None
    done: dict[str, m.Done] | None = None
    adopted: bool = False  # committed by a coordinator that is gone; we finish it
    commit_sent_at: float = -1e18  # last (re)sent to participants not yet Done


class Coordinating:
    """Coordinator methods of RoundCore; see rounds.py for the state they use."""

    def _on_ack(self, now, sender, msg: m.Ack) -> list:
        r = self.leading
        if r is None or r.commit is not None or (msg.round_id, msg.term) != \
                (r.propose.round_id, r.propose.term) or sender not in r.propose.participants:
            return []
        r.acks.add(sender)
        if r.acks != set(r.propose.participants):
            return []
        return self._commit(now, r)

    def _commit(self, now, r: _Round, fast: bool = False) -> list:
        p = r.propose
        members = tuple(self.known[i] for i in p.participants)
        r.commit = m.Commit(p.round_id, p.term, p.step, p.participants, members, p.state_hash,
                            fast)
        self.last_led = r.commit
        self.led_recent[r.commit.round_id] = r.commit.participants
        while len(self.led_recent) > LED_REMEMBERED:
            del self.led_recent[min(self.led_recent)]
        self.blamed = {b for b in self.blamed if b[0] in self.led_recent}
        r.done, r.since, r.commit_sent_at = {}, now, now
        # Everyone learns of the commit: a non-participant may have to finish it
        # as the next coordinator, and all of them adopt its view on Apply.
        return self._broadcast(r.commit, now) + self._on_commit(now, self.me.id, r.commit)

    def _on_done(self, now, sender, msg: m.Done) -> list:
        self._saw_done(now, sender, msg)
        led = self.led_recent.get(msg.round_id)
        if msg.blame and led is not None and (msg.round_id, sender) not in self.blamed:
            # The first failed Done ended the round; a stalled link's
            # neighbours report at about the same moment, and are heard, even
            # once the next round is committed (the accuser's transfer may
            # time out after the abort it caused elsewhere).
            self.blamed.add((msg.round_id, sender))
            if (msg.round_id, "accused", msg.blame) not in self.blamed:
                # In the direct all-reduce every participant waits on every
                # other, so a member that never sends is named by each that
                # timed out first: the first accusation is the pair's, the
                # rest cost nobody else their place.
                self.blamed.add((msg.round_id, "accused", msg.blame))
                self._blame_link(now, sender, msg.blame, led)
        r = self.leading
        if r is None or r.commit is None or msg.round_id != r.commit.round_id or \
                sender not in r.commit.participants:
            return []
        r.done[sender] = msg
        if not msg.ok:
            return self._finish(now, apply=False, poisoned=msg.poisoned)
        oks = [d for d in r.done.values() if d.ok]
        if len(oks) == len(r.commit.participants):
            agree = len({d.result_hash for d in oks}) == 1
            # Honest participants compute one result (the ring copies each
            # segment from its owner; a robust rule runs on the same rows):
            # two hashes mean a member lied in its Done or fed the ring
            # different bytes. Traced like a poisoned round (suspicion.py).
            return self._finish(now, apply=agree, poisoned=not agree)
        return []

    def _lead(self, now: float) -> list:
        r = self.leading
        if r is not None:
            if r.commit is None and now - r.since > self.t.ack:
                # Someone never acked: propose again without it (suspicion.py).
                self._blame_non_ackers(now, r.propose, r.acks)
                self.leading = None
            elif r.commit is not None:
                # An adopted round: if any heartbeat shows the round applied, the
                # dead coordinator had decided "apply"; otherwise wait one ack
                # period for such a heartbeat before a dead participant forces
                # the abort.
                seen = self._outcome_seen(r.commit.round_id) if r.adopted else None
                if seen is not None:
                    return self._finish(now, apply=seen)  # my predecessor had decided
                if r.adopted and self._complete_among_the_living(r, now):
                    # Every live participant holds the same complete result: the
                    # dead coordinator may have applied it before its Apply got
                    # out, so aborting could give this step a second hash later.
                    return self._finish(now, apply=True)
                grace = r.adopted and now - r.since < self.t.ack
                dead = any(not self.alive(p, now) for p in r.commit.participants)
                if (dead and not grace and not r.adopted) or \
                        now - r.since > self.t.collective or self._dropped(r.commit):
                    return self._finish(now, apply=False)
                self.stall = f"round {r.commit.round_id} running"
                return self._resend_commit(now, r)
            else:
                self.stall = f"round {r.propose.round_id} proposed, waiting for acks"
                return []
        if self.observed is not None:
            return self._adopt(now)
        return self._maybe_propose(now)

    def _complete_among_the_living(self, r: _Round, now: float) -> bool:
        """Every participant but the dead committer reported ok with one result
        hash (the committer applied only if all of them had: its own Done is
        implied), and the live members are a majority of the view: only the
        side that can run rounds may decide for the dead. A participant whose
        Done is missing is not presumed ok, dead or not: its ring may have
        failed at the last chunk while ours finished, and a side that can see
        it would abort (two hashes for one step; found by the property run
        once a Leave could shrink the quorum)."""
        if not self._quorum(p for p in self.members if self.alive(p, now)):
            return False  # cut off with a minority: "dead" may only mean unreachable
        others = [p for p in r.commit.participants if p != self.committer]
        dones = [r.done.get(p) for p in others]
        return bool(others) and all(d is not None and d.ok for d in dones) and \
            len({d.result_hash for d in dones}) == 1

    def _dropped(self, c: m.Commit) -> bool:
        """A participant's heartbeat says it settled c as aborted (it learned
        that from others, or it restarted): its Done will never come."""
        return any(c.round_id <= b.aborted <= self.max_round_id
                   for i, b in self.beats.items() if i in c.participants and i != self.me.id)

    def _adopt(self, now: float) -> list:
        """I lead now and a committed round is undecided: end it before anything new."""
        c = self.observed
        self.term = max(self.term, self.max_round_id) + 1
        self.leading = _Round(m.Propose(c.round_id, self.term, c.step, ZERO_HASH,
                                        c.participants), now, set(c.participants), c, {},
                              adopted=True)
        if self.my_done is None and self.active is None and self.me.id in c.participants:
            # I took part before I restarted: my result is gone, so the round cannot apply.
            self.my_done = m.Done(c.round_id, False, ZERO_HASH)
        return self._on_done(now, self.me.id, self.my_done) if self.my_done else []

    def _maybe_propose(self, now: float) -> list:
        if self.resuming and self.epoch == 0 and self.started_at is not None and \
                now - self.started_at < self.t.rejoin_grace:
            self.stall = "resuming from a checkpoint: waiting rejoin_grace for peers"
            return []
        behind = self.view_behind(now)
        if behind is not None:
            self.stall = f"our view is out of date ({behind} applied later rounds): asking for it"
            return []
        live = {i: r for i, r in self.readies.items() if self.alive(i, now) and
                self.trusted(i, now) and not self.excluded_now(i, now)}
        newest = self.newest_step(now)
        groups: dict[tuple[int, bytes], list[str]] = {}
        for i, r in live.items():
            groups.setdefault((r.step, r.state_hash), []).append(i)
        held = max((len(set(v) & set(self.members)) for (st, _), v in groups.items()
                    if st == newest), default=0)
        self.quorum_held = held
        # Only the newest step a member holds may run: peers behind it (restarted
        # from older checkpoints) sync to it first, however many they are.
        eligible = [(k, v) for k, v in groups.items() if k[0] == newest and self._quorum(v)]
        if not eligible:
            self.stall = (f"no majority ready on one state at step {newest}: "
                          f"{held} of {self.quorum_needed} needed")
            if self.step < self.floor == newest:
                self.stall += (" (this peer applied that step before it restarted, and no live "
                               "peer holds it yet)")
            return []
        (step, h), ids = max(eligible, key=lambda kv: (len(kv[1]), kv[0][1]))
        # A poisoned round is being traced: leave half of the suspects out.
        probe = self._probe(ids) if self.suspects else set()
        ids = [i for i in ids if i not in probe]
        left_out = probe | self.left_out_now(now)
        # Wait (at most `gather`) for live members not yet ready with this
        # state (one being repaired re-sends Ready once synced), and for synced
        # joiners at this very step, so a peer that just caught up enters this round.
        waiting = [p for p in self.members if self.alive(p, now) and p not in ids
                   and p not in left_out]
        waiting += [p for p, b in self.beats.items()
                    if p not in self.members and self.alive(p, now) and b.synced
                    and b.step == step and (p not in live or live[p].step != step)
                    and p not in left_out]
        # A joiner still catching up (fetching, synced to an older step, or
        # synced to this one and still making its first contribution) is
        # waited for once, until it is ready or CATCHUP_MAX_FACTOR gathers
        # passed: where rounds are shorter than a state transfer plus the
        # joiner's first contribution, a swarm that never waited would apply
        # just before each of its arrivals and it would never enter (a wait
        # of one gather let no 1 GB joiner in on this 2-core machine: each
        # fetched the state at every step for minutes; at 2 GB two joiners
        # synced before the founder's first Ready, were waited for one
        # gather while making their first contributions, and entered only
        # after 6 more syncs each, 190 s). The joiners waited
        # for stay waited for in this gather once they have synced, until
        # their Ready. Such waits start only CATCHUP_EVERY times the last
        # one's length after it ended: identities that heartbeat and never
        # contribute cost a bounded share of the swarm's time.
        catching = [p for p in self.catching_now if p in self.beats and p not in ids
                    and p not in left_out and self.alive(p, now)]
        if not catching and now - self.catchup_wait_at >= CATCHUP_EVERY * max(
                self.t.gather, self.catchup_wait_len):
            catching = [p for p, b in self.beats.items()
                        if p not in self.members and p not in self.waited_once and
                        p not in left_out and self.alive(p, now) and p not in ids and
                        (not b.synced or b.step <= step)]
        waiting += [p for p in catching if p not in waiting]
        first = self.first_ready_at if self.first_ready_at is not None else now
        limit = CATCHUP_MAX_FACTOR * self.t.gather if catching else self._gather_for(waiting)
        if waiting and now - first < limit:
            if catching and not self.catching_now:
                self.catching_now = set(catching)
                self.waited_once = (self.waited_once | set(catching)) & set(self.beats)
            self.stall = "gathering: waiting for " + ", ".join(
                "this peer's own contribution" if p == self.me.id else p for p in sorted(waiting))
            return []
        if self.catching_now or catching:
            self.catchup_wait_at = now
            self.catchup_wait_len = now - first
            self.waited_once = (self.waited_once | set(catching)) & set(self.beats)
            self.catching_now = set()
        participants = tuple(sorted(ids))
        self.probing = probe
        # Round ids and terms go on from the highest any member or participant knows: a
        # coordinator that restarted (counters back at 0) would otherwise
        # propose rounds everyone has seen settled.
        # A proposal's term is its round id; a member's heartbeat term tells the
        # highest id it has acked, so a round committed by a predecessor that we
        # never saw is not reused. Values no honest swarm reaches are ignored.
        beats = [b for i, b in self.beats.items() if i != self.me.id and self.alive(i, now)
                 and (i in self.members or i in participants)]
        base = max([self.max_round_id, self.term] + [
            v for b in beats for v in (b.epoch, b.aborted, b.term) if v < ROUND_ID_LIMIT])
        self.max_round_id = self.term = base + 1
        prop = m.Propose(self.max_round_id, self.term, step, h, participants)
        if self._repeats_last_round(prop) and self._may_ack(now, self.me.id, prop):
            # The participants of the round I led last, all ready on the state
            # it made: skip the Propose/Ack round trip (each of them checks the
            # fast Commit as it would have the Propose, and a refusal aborts
            # the round at once). Anything new (a joiner, a member missing or
            # left out, a failed round) goes through Propose and Ack, whose
            # timeout finds the silent.
            self._ack(self.me.id, prop)
            self.leading = _Round(prop, now, set(participants))
            return self._commit(now, self.leading, fast=True)
        self.leading = _Round(prop, now, set())
        out = [Send(i, prop) for i in participants if i != self.me.id]
        if self.me.id in participants:
            out += self._on_propose(now, self.me.id, prop)
        return out

    def _repeats_last_round(self, prop: m.Propose) -> bool:
        """prop is for the step my last led round made, among its very
        participants, and that round is the last one applied here: the view
        did not change and every participant was just heard from in it."""
        last = self.last_led
        return last is not None and self.epoch == last.round_id and \
            prop.participants == last.participants and prop.step == last.step + 1 and \
            not self.probing and self.me.id in prop.participants

    def _gather_for(self, waiting: list[str]) -> float:
        """How long a round waits, from its first Ready, for the peers in
        `waiting`: long enough for each one's own measured lateness (how far
        behind the first Ready for their step its Readies came, a decaying
        maximum: rounds._on_ready), at least `gather`, at most GATHER_MAX_FACTOR gathers. A
        fixed wait left a peer 1.5x slower than the rest out of every round,
        its inner steps thrown away (issue 18); one far slower than the cap
        is still left out rather than idling everyone."""
        need = self.t.gather
        for p in waiting:
            late = self.lateness.get(p)
            if late is not None:
                need = max(need, LATENESS_MARGIN * late + 2 * self.t.heartbeat_every)
        return min(need, GATHER_MAX_FACTOR * self.t.gather)

    def _measure_lateness(self, peer: str, late: float) -> None:
        """A decaying maximum: one early Ready (right after a state sync, or a
        lucky round) does not erase a slow peer's measure at once."""
        self.lateness[peer] = max(late, LATENESS_DECAY * self.lateness.get(peer, 0.0))

    def _resend_commit(self, now: float, r: _Round) -> list:
        """A participant that acked and then lost the Commit (a partition
        healed, a queue overflowed) holds the round open until the collective
        timeout, and sees a leader that commits nothing (deposing.py): tell
        those not yet Done again, once per ack timeout."""
        if r.adopted or now - r.commit_sent_at < self.t.ack:
            return []
        r.commit_sent_at = now
        return [Send(p, r.commit) for p in r.commit.participants
                if p != self.me.id and p not in r.done and self.alive(p, now)]

    def _finish(self, now: float, apply: bool, poisoned: bool = False) -> list:
        r = self.leading
        self.leading = None
        if not r.adopted:
            self._learn_from_round(now, r.commit.participants, apply, poisoned)
        msg = m.Apply(r.commit.round_id) if apply else m.Abort(r.commit.round_id)
        return self._broadcast(msg, now) + self._settle(now, self.me.id, r.commit.round_id, apply)
