"""Membership and round agreement, sans-IO.

`RoundCore` is one peer's view of the swarm. It takes messages and the time as
inputs and returns actions; it never touches a socket or a clock, so every
failure (a dead coordinator, a partition, a peer that hangs) is a unit test
with injected time. The daemon moves its messages and runs its actions.

Model (docs/swarm.md has the reasoning):
  * The *view* is the set of peers that took part in the last applied round.
    Only the view's members count towards a quorum: a round is proposed only
    among peers holding a strict majority of the view, so when the swarm is
    cut in two at most one side advances the shared step.
  * Failure detection is by silence: any message from a peer refreshes it; a
    peer silent for `dead_after` is dead (SIGKILL and SIGSTOP look the same);
    a Leave makes it dead at once.
  * A peer that stops with Ctrl-C leaves the view for good when a member
    that stays answers it, and the quorum shrinks (departing.py).
  * The coordinator is the live view member with the smallest id. There is
    no election: when it dies, everyone's detector agrees on the next one
    within `dead_after`, which takes over with a higher term. Killing it costs
    at most the round in flight. One that lives and stalls is deposed by the
    evidence every member sees alike (deposing.py).
  * History is never rewritten: the newest state a live view member holds
    wins (peers behind it sync, however many they are), and rounds run only
    for that newest step.
  * A round: members broadcast Ready(step, hash); the coordinator picks the
    newest (step, hash) ready at a majority of the view, proposes the round to the
    peers holding exactly that state (late joiners included), commits when
    every one of them acked (or at once, a fast Commit, when the round
    repeats the last one it led among the same peers: coordinating.py), and
    the driver runs the collective. Each
    participant reports Done; Apply follows only if all were ok, else Abort:
    a result is complete or it is discarded, never partial. A participant
    keeps its result until Apply or Abort; if the coordinator dies in
    between, its successor asks again and applies if anyone had applied.
  * Peers whose state differs from the majority's are not proposed; they get
    SyncNeeded and fetch the state, then send Ready again.
"""

from __future__ import annotations


# Re-exported: callers use them as rounds.Send, rounds.Timeouts, ...
from peerlearn.swarm.actions import (  # noqa: F401
    ZERO_HASH,
    Applied,
    ApplyResult,
    DiscardResult,
    Send,
    StartCollective,
    SyncNeeded,
    Timeouts,
    ViewChanged,
)
from peerlearn.swarm.coordinating import ROUND_ID_LIMIT, Coordinating, _Round
from peerlearn.swarm.departing import MAX_DEPARTED, Departing  # noqa: F401
from peerlearn.swarm.deposing import LEAD_MAX_S, Deposing
from peerlearn.swarm.cooldown import Cooldowns
from peerlearn.swarm.distrust import DISTRUST_FIRST_S, DISTRUST_MAX_S, Distrusting
from peerlearn.swarm.suspicion import EXCLUDE_FIRST_S, EXCLUDE_MAX_S, Suspecting
from peerlearn.swarm.welcoming import MAX_EPOCH_JUMP, MAX_KNOWN, Welcoming  # noqa: F401
from peerlearn.swarm.participating import Participating
from peerlearn.swarm.settling import Settling
from peerlearn.wire import control as m


# ------------------------------------------------------------------ core


class RoundCore(Coordinating, Participating, Settling, Departing, Deposing, Distrusting,
                Suspecting, Welcoming):
    """One peer's membership and round state. Not thread-safe: one driver owns it."""

    def __init__(self, me: m.PeerInfo, timeouts: Timeouts = Timeouts(), *,
                 founder: bool = False, step: int = 0, state_hash: bytes = ZERO_HASH,
                 resuming: bool = False, record: Applied | None = None):
        self.me = me
        self.t = timeouts
        # I left this view for good (my record says so): my vote counts nowhere
        # until I take part in an applied round again.
        self.departed = record is not None and record.departed
        self.leaving = False  # stopping: no more acks, Readies or Staying
        self.stayers: set[str] = set()  # members that answered my Leave with Staying
        # Members that left for good -> the last round they took part in.
        self.departed_peers: dict[str, int] = {}
        # Peers whose announced state was refused (distrust.py).
        self.distrusted = Cooldowns(DISTRUST_FIRST_S, DISTRUST_MAX_S)
        # The coordinator's search for a member poisoning rounds (suspicion.py).
        self.suspects: set[str] = set()
        self.probing: set[str] = set()  # suspects left out of the round in flight
        self.excluded = Cooldowns(EXCLUDE_FIRST_S, EXCLUDE_MAX_S)
        self.exclusions = 0
        # Members that let a proposal time out while talking to us (suspicion.py).
        self.stalled = Cooldowns(2 * timeouts.gather, EXCLUDE_MAX_S)
        self.stall_exclusions = 0
        self.ack_misses: dict[str, int] = {}  # proposals in a row each let time out
        self.took_part: m.Commit | None = None  # the round I took part in last
        self.last_led: m.Commit | None = None  # the round I committed last...
        self.led_recent: dict[int, tuple[str, ...]] = {}  # round -> participants, last few
        # Accusations heard: (round, accuser) and (round, "accused", id).
        self.blamed: set[tuple] = set()
        # Leaders that stalled rounds, and the evidence (deposing.py).
        self.deposed = Cooldowns(4 * (2 * timeouts.gather + 2 * timeouts.ack +
                                      timeouts.dead_after), LEAD_MAX_S)
        self.depositions = 0
        self.quorum_ready_on: tuple[int, bytes] | None = None
        self.quorum_ready_since: float | None = None
        self.dones_round = 0  # the observed round whose Dones we count...
        self.dones_from: set[str] = set()
        self.all_done_at: float | None = None  # ...and when the last one came
        self.epoch = 0  # id of the last round applied here
        self.aborted = 0  # id of the last committed round settled as aborted here
        self.members: dict[str, m.PeerInfo] = {me.id: me} if founder else {}
        self.known: dict[str, m.PeerInfo] = {me.id: me}
        self.step = step
        self.state_hash = state_hash
        self.synced = founder  # a joiner has no shared state until it syncs
        self.term = 0
        self.max_round_id = 0
        # The newest step this peer ever reached (from its record on disk): no
        # round for an older step, whatever checkpoint it restarted from.
        self.floor = 0
        self.floor_hash: bytes | None = None  # the state hash at that step
        # Per-peer tables: their keys are in `seen` (id -> when last heard or
        # named), which holds at most MAX_KNOWN ids outside the view (welcoming.py).
        self.seen: dict[str, float] = {}
        self.swept_at = -1e18
        self.refused_unknown = 0  # messages and names of new ids refused: the table was full
        self.last_heard: dict[str, float] = {}
        self.left: set[str] = set()
        self.beats: dict[str, m.Heartbeat] = {}
        self.beat_at: dict[str, float] = {}
        self.readies: dict[str, m.Ready] = {}
        self.first_ready_at: float | None = None
        self.waited_once: set[str] = set()  # joiners a gather already waited for
        self.lateness: dict[str, float] = {}  # member -> its Readies' smoothed delay
        self.first_ready_of: dict[int, float] = {}  # step -> when its first Ready came
        self.catchup_wait_at = -1e18  # when a gather that waited for one ended
        self.catchup_wait_len = 0.0  # ...and how long it had waited
        self.catching_now: set[str] = set()  # joiners this gather waits for (catching up)
        self.acked: tuple[int, int] = (0, 0)  # (round_id, term) of my last Ack
        self.acked_to: str | None = None  # ...and the coordinator it went to
        self.observed: m.Commit | None = None  # latest undecided commit seen
        self.observed_at = -1e18
        self.commit_forwarded_at = -1e18
        self.committer: str | None = None  # who sent it
        self.active: m.Commit | None = None  # ...when I am one of its participants
        self.my_done: m.Done | None = None
        self.done_sent_at = -1e18  # last (re)sent
        self.done_at = -1e18  # when my part of the round in flight ended
        self.leading: _Round | None = None
        self.last_beat_at = -1e18
        self.last_dead_beat_at = -1e18
        self.view_asked_at = -1e18
        self.sync_requested: tuple[int, bytes] | None = None
        # The step an ApplyResult told the driver to reach, until it says it
        # did (result_applied) or stayed (state_synced). Meanwhile members
        # announcing that step are not a parity mismatch: the driver's apply
        # may wait behind a checkpoint on its state thread (22 s at 2 GB here).
        self.applying: int | None = None
        self.rejected = 0  # messages dropped as invalid in context
        self.started_at: float | None = None
        # A founder resuming from a checkpoint: peers that held newer states
        # before the restart get rejoin_grace to come back before round one.
        self.resuming = resuming
        # A round I knew of after the last one I applied, when I restarted:
        # how it ended is unknown to me (settling._finishes_my_round).
        self.unsettled_round: int | None = None
        # Newer states members announced that no majority backs (settling._backed).
        self.unbacked_states = 0
        self.unbelieved: set[tuple[str, tuple[int, bytes]]] = set()
        if record is not None:
            self.epoch, self.floor, self.floor_hash = record.epoch, record.step, record.state_hash
            self.max_round_id, self.term = record.max_round_id, record.term
            if record.max_round_id > record.epoch:
                self.unsettled_round = record.max_round_id
            if founder:  # a joiner's view comes with its Welcome (which also
                # tells the members our new addresses); a founder starts from its own
                self.members = {p.id: me if p.id == me.id else p for p in record.members}
                self.known.update({i: p for i, p in self.members.items() if i != me.id})
            self.resuming = False
        # A restarted joiner's last applied view (its record's): kept over a
        # Welcome from a contact whose view is older.
        self.recorded_view = record.members if record is not None and not founder else ()
        # Why the coordinator proposes nothing (None while rounds run): the
        # driver logs it when it changes and exports it as a metric.
        self.stall: str | None = None
        self.quorum_held = 0  # live view members ready on the state a round would use
        self.view_asked_of: str | None = None  # whose Welcome may replace our view
        self.join_target: str | None = None  # whom a joiner asked (id or host:port)
        self.my_ready: m.Ready | None = None  # repeated until a round takes it
        self.ready_sent_at = -1e18

    # ---------------------------------------------------------- queries

    def alive(self, peer: str, now: float) -> bool:
        if peer == self.me.id:
            return True
        if peer in self.left:
            return False
        heard = self.last_heard.get(peer)
        return heard is not None and now - heard <= self.t.dead_after

    def coordinator(self, now: float) -> str | None:
        """The smallest live voter we trust: a member that left for good, one
        whose announced state proved false (distrust.py), one deposed for
        stalling rounds as leader (deposing.py), or one announcing a step past
        the newest we believe (a state no majority backs: settling._backed)
        leads nothing: it would propose only for that step, and no round
        would run while it lives."""
        return self._most_followed(now, self._may_lead(now))

    def _may_lead(self, now: float) -> list[str]:
        newest = self.newest_step(now)
        return [p for p in self.voters() if self.alive(p, now) and self.trusted(p, now)
                and not self._beyond_belief(p, newest)]

    def is_coordinator(self, now: float) -> bool:
        return self.coordinator(now) == self.me.id

    def _member_beats(self, now: float) -> dict[str, m.Heartbeat]:
        """Heartbeats of live view members other than me: the only reports a
        decision rests on. A non-member's word settles nothing."""
        return {i: b for i, b in self.beats.items() if self.trusted(i, now)
                if i in self.members and i != self.me.id and self.alive(i, now)}

    def view_behind(self, now: float) -> str | None:
        """A live member whose heartbeat shows a view newer than ours (rounds
        were applied without us), or None. Until our view catches up (its
        Welcome replaces ours) we neither propose nor ack: a majority of a
        stale view is not a majority of the current one, so two coordinators
        could each hold a quorum of their own view."""
        for i, b in self._member_beats(now).items():
            if self.epoch < b.epoch < ROUND_ID_LIMIT:
                return i
        return None

    def _broadcast(self, msg, now: float) -> list:
        return [Send(p, msg) for p in sorted(self.known)
                if p != self.me.id and (self.alive(p, now) or p not in self.last_heard)]

    # ---------------------------------------------------------- inputs

    def join_via(self, contact: str) -> list:
        """Start joining through a live member (its id as the transport knows it)."""
        self.join_target = contact
        return [Send(contact, m.Join(self.me))]

    def joining_at(self, target: str) -> None:
        """The driver asks `target` (a peer id, or the host:port it advertises)
        for the view: only a Welcome from that peer is taken."""
        self.join_target = target

    def local_ready(self, now: float, step: int, state_hash: bytes) -> list:
        """The driver's update for `step` is ready and its state hashes to state_hash."""
        self.step, self.state_hash, self.synced = step, state_hash, True
        if self.leaving:
            return []
        ready = m.Ready(step, state_hash, self.me, self.departed)
        self.my_ready, self.ready_sent_at = ready, now
        return self._broadcast(ready, now) + self.receive(now, self.me.id, ready)

    def not_ready(self) -> None:
        """The driver has no update any more (its caller withdrew it)."""
        self.my_ready = None

    def state_synced(self, step: int, state_hash: bytes) -> None:
        """The driver fetched and verified the state (step, state_hash)."""
        self.step, self.state_hash, self.synced = step, state_hash, True
        self._raise_floor()
        self.sync_requested = None
        self.applying = None

    def sync_failed(self) -> None:
        """The driver could not fetch or verify the state it was told to: the
        parity check asks again (perhaps for a newer state) at the next tick."""
        self.sync_requested = None

    def result_applied(self, step: int, state_hash: bytes) -> None:
        """After ApplyResult: the driver's new state and its hash."""
        self.step, self.state_hash = step, state_hash
        self.applying = None
        self._raise_floor()

    def _raise_floor(self) -> None:
        if self.step >= self.floor:
            self.floor, self.floor_hash = self.step, self.state_hash

    def record(self) -> Applied:
        """What the driver writes to disk after each applied round and sync
        (Applied): the newest step reached, not the one held now (a sync may
        go below it when every holder of the newest restarted older)."""
        step, h = (self.floor, self.floor_hash) if self.floor_hash is not None else \
            (self.step, self.state_hash)
        # A restarted joiner has no view until its Welcome: its record keeps
        # the last view it applied, or a restart as founder (no --join) from
        # this record would have none and wait for ever (the property run
        # found it).
        view = tuple(self.members.values()) or tuple(self.recorded_view)
        return Applied(self.epoch, view, self.max_round_id, self.term, step, h, self.departed)

    def collective_finished(self, now: float, round_id: int, ok: bool,
                            result_hash: bytes = ZERO_HASH, poisoned: bool = False,
                            blame: str = "") -> list:
        """poisoned: not ok because the mean failed this peer's check; blame:
        not ok because the link with that participant stalled."""
        took_part = self.took_part
        blame = blame if not ok and took_part is not None and took_part.round_id == round_id \
            and blame in took_part.participants and blame != self.me.id else ""
        if self.leaving:
            return []
        if self.active is None or self.active.round_id != round_id:
            if not blame:
                return []
            # Decided (aborted) while my transfer was still timing out: the
            # others' failures spread from mine. The accusation still counts.
            late = m.Done(round_id, False, ZERO_HASH, False, blame)
            return self._broadcast(late, now) + self.receive(now, self.me.id, late)
        self.my_done = m.Done(round_id, ok, result_hash, poisoned and not ok, blame)
        self.done_sent_at = now
        self.done_at = now
        # To every member, not only the leader: a leader sitting on a round
        # every participant finished is then plain to all (deposing.py).
        return self._broadcast(self.my_done, now) + self.receive(now, self.me.id, self.my_done)

    def receive(self, now: float, sender: str, msg) -> list:
        """One validated message from an authenticated sender."""
        if sender != self.me.id:
            if not self._admit(sender, now):
                return []  # a new id while the table is full: counted, not read
            self.seen[sender] = now
            self.last_heard[sender] = now
            self.left.discard(sender)
        if self.leaving and not isinstance(msg, m.Staying):
            return []  # the others count us dead from our Leave on: we decide nothing more
        handler = getattr(self, "_on_" + type(msg).__name__.lower(), None)
        if handler is None:  # a message for the daemon, not for the round logic
            self.rejected += 1
            return []
        peer = getattr(msg, "peer", None)  # Heartbeat, Join, Ready describe their sender
        if peer is not None and peer.id != sender:
            self.rejected += 1  # a member speaking in another's name
            return []
        return handler(now, sender, msg)

    def tick(self, now: float) -> list:
        if self.leaving:
            return []  # not even a heartbeat: it would make us alive again to the others
        if self.started_at is None:
            self.started_at = now
        out: list = []
        if now - self.last_beat_at >= self.t.heartbeat_every:
            self.last_beat_at = now
            held = self.observed or (self.leading.commit if self.leading else None)
            beat = m.Heartbeat(self.epoch, self.aborted, self.term, self.step,
                               self.state_hash, self.synced, self.me, self.departed,
                               self._my_choice(now, self._may_lead(now)) or "",
                               held.round_id if held is not None else 0)
            out += self._broadcast(beat, now)
            # Peers we think dead still hear from us now and then: that is how
            # the two sides of a healed partition find each other again.
            if now - self.last_dead_beat_at >= self.t.dead_after:
                self.last_dead_beat_at = now
                out += [Send(p, beat) for p in sorted(self.known)
                        if p != self.me.id and not self.alive(p, now) and p in self.last_heard]
        self._forget_long_gone(now)
        out += self._learn_missed_decision(now)
        self.stall = None
        self._check_leader(now)
        out += self._check_sync(now)
        if self.is_coordinator(now):
            out += self._lead(now)
        elif self.leading is not None and self.leading.commit is not None:
            # A smaller id is back (perhaps restarted, knowing nothing of this
            # round): the round I committed is still mine to decide.
            out += self._lead(now)
        elif self.leading is not None:
            self.leading = None  # someone with a smaller id is back; let it lead
        coord = self.coordinator(now)
        ready = self.my_ready
        if ready is not None and coord == self.me.id and self.me.id not in self.readies and \
                (ready.step, ready.state_hash) == (self.step, self.state_hash):
            self.readies[self.me.id] = ready  # dropped when a round I held was settled
        if ready is not None and (ready.step, ready.state_hash) == (self.step, self.state_hash) \
                and self.active is None and coord not in (None, self.me.id) and \
                now - self.ready_sent_at >= self.t.ack:
            # A Ready is sent once; a coordinator that restarted (or took over
            # after messages to its predecessor were lost) never saw ours.
            self.ready_sent_at = now
            out.append(Send(coord, ready))
        c = self.observed
        if c is not None and coord not in (None, self.me.id) and self.leading is None:
            b = self.beats.get(coord)
            fresh = self.beat_at.get(coord, -1e18) > self.observed_at
            if b is not None and fresh and b.epoch < c.round_id and b.aborted < c.round_id \
                    and b.holding != c.round_id and now - self.commit_forwarded_at >= self.t.ack:
                # The leader's heartbeat shows this round unsettled there and
                # not held (it restarted, or never saw it): it adopts it from
                # us. One that holds it is running it: a copy back would only
                # be refused (at 1,024 peers, 35 copies per member per round).
                self.commit_forwarded_at = now
                out.append(Send(coord, c))
        if self.my_done is not None and coord not in (None, self.me.id) and \
                now - self.done_sent_at >= self.t.heartbeat_every:
            # Keep telling whoever leads now: a new coordinator needs it to end the round.
            self.done_sent_at = now
            out.append(Send(coord, self.my_done))
        return out

    # ---------------------------------------------------------- handlers

    def _on_heartbeat(self, now, sender, msg: m.Heartbeat) -> list:
        self.known[sender] = msg.peer  # its own word on its addresses: a restart may move them
        self.beats[sender] = msg
        if sender in self.departed_peers and not msg.departed and \
                self.departed_peers[sender] < msg.epoch <= self.max_round_id:
            del self.departed_peers[sender]  # it came back through a later round we know
        self.beat_at[sender] = now
        if msg.epoch > self.epoch and self.members and self.observed is None and \
                now - self.view_asked_at >= self.t.heartbeat_every * 2:
            # Rounds were applied without us (we were cut off): our view is
            # stale, and with it our idea of the coordinator and the quorum.
            # Ask for the current view; its Welcome replaces ours.
            self.view_asked_at = now
            self.view_asked_of = sender
            return [Send(sender, m.Join(self.me))]
        return []

    def _on_join(self, now, sender, msg: m.Join) -> list:
        self.known[sender] = msg.peer
        if msg.introduce:
            return []  # it has its view; knowing it, we heartbeat it from now on
        if not self.members:
            return []  # joining ourselves: no view to give; the joiner asks again
        return [Send(sender, m.Welcome(self.epoch, self.step, tuple(self.members.values())))]

    def _on_ready(self, now, sender, msg: m.Ready) -> list:
        self.known.setdefault(sender, msg.peer)
        prev = self.readies.get(sender)
        self.readies[sender] = msg
        if self.first_ready_at is None:
            self.first_ready_at = now
        first = self.first_ready_of.setdefault(msg.step, now)
        if len(self.first_ready_of) > 8:
            # The steps of the last few rounds are enough. The one farthest
            # from ours goes, not the oldest: a member sending Readies for
            # far steps would otherwise evict the current step's first time
            # and make every honest peer look punctual.
            del self.first_ready_of[max(self.first_ready_of,
                                        key=lambda k: (abs(k - self.step), k))]
        if prev is None or (prev.step, prev.state_hash) != (msg.step, msg.state_hash):
            # A new Ready (not a repeat): how far behind the first Ready for
            # its step it came, even after that round went ahead without it.
            self._measure_lateness(sender, now - first)
        return self._lead(now) if self.is_coordinator(now) else []
