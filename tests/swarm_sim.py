"""A deterministic, in-memory swarm of RoundCores for protocol tests.

Time is simulated; every message goes through the real wire encoder and
decoder; collectives, state sync and local training are modelled by the
simulator with the semantics the daemon gives them: a collective succeeds
only if every participant is alive and connected to the others for its whole
duration, and its result is a pure function of the participants' states.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random

from peerlearn.swarm import rounds as r
from peerlearn.swarm.contributions import Contributions
from peerlearn.swarm.errors import StateReplaced
from peerlearn.wire import control as m


def h(*parts) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()


class SimPeer:
    def __init__(self, sim, pid: str, founder: bool, timeouts: r.Timeouts, record=None):
        self.sim = sim
        self.id = pid
        info = m.PeerInfo(pid, f"{pid}:1", f"{pid}:2")
        self.core = r.RoundCore(info, timeouts, founder=founder, record=record)
        self.alive = True  # False: killed (never returns) or stopped
        self.killed = False
        self.step = 0
        self.state = r.ZERO_HASH if founder else None
        self.pending = None  # (round_id, result_hash) held until Apply/Abort
        self.join_asked_at = 0.0
        # applied.json: written at every applied round and sync, as the daemon
        # does; a process that restarts and writes nothing keeps the old one.
        self.disk_record = record
        self.slowdown = 1.0  # its compute between rounds takes this many times the sim's
        # Seconds its driver takes to apply a decided round (a checkpoint
        # ahead of it on the state thread), during which its core waits.
        self.apply_delay = 0.0
        self.applied_steps: dict[int, bytes] = {}  # step -> state hash after applying
        # The caller's contributions, decided by the daemon's own rules: a
        # peer that wants a round submits one token (its "pseudo-gradient").
        self.contribs: Contributions[str] = Contributions()
        if founder:
            self.applied_steps[0] = self.state


class Sim:
    def __init__(self, n: int, timeouts=r.Timeouts(heartbeat_every=0.1, dead_after=0.6,
                                                   gather=1.0, ack=0.5, collective=5.0),
                 latency=0.01, compute=0.2, collective_time=0.15, sync_time=0.1,
                 jitter=0.0, seed=0, durable=True, ready_after_sync=0.0):
        self.now = 0.0
        # A peer that synced is Ready this long after (its first contribution
        # is made against the fetched state: seconds at GB sizes).
        self.ready_after_sync = ready_after_sync
        self.t = timeouts
        self.latency = latency
        self.jitter = jitter  # each message takes latency + U(0, jitter): reordering
        # A restarted peer keeps its applied record (written at every round),
        # as the daemon does; False: it forgets everything past its checkpoint.
        self.durable = durable
        self.rng = random.Random(seed)
        self.compute = compute
        self.collective_time = collective_time
        self.sync_time = sync_time
        self.queue: list = []
        self.seq = itertools.count()
        self.peers: dict[str, SimPeer] = {}
        self.cut: set[frozenset] = set()  # unordered pairs that cannot talk
        self.rejected_wire = 0
        self.events: list = []
        self.joining: dict[str, str] = {}  # pid -> its contact, until it has a view
        self.settled: dict[str, object] = {}  # contribution token -> how it ended
        self.settle_errors: list = []  # a token ended twice, or applied with another result
        self.add("p00", founder=True)
        for i in range(1, n):
            self.join(f"p{i:02d}", via="p00")

    # ------------------------------------------------------------ control

    def add(self, pid: str, founder=False) -> SimPeer:
        p = SimPeer(self, pid, founder, self.t)
        self.peers[pid] = p
        if founder:
            self.at(self.compute, self._ready, p)
        return p

    def join(self, pid: str, via: str) -> SimPeer:
        p = self.add(pid)
        self.joining[pid] = via
        self.run_actions(p, p.core.join_via(via))
        return p

    def _retry_joins(self) -> None:
        """As the daemon does: a peer with no view yet asks its contact again."""
        for pid, via in list(self.joining.items()):
            p = self.peers[pid]
            if p.core.members:
                del self.joining[pid]
            elif p.alive and self.now - p.join_asked_at >= 0.5:
                p.join_asked_at = self.now
                self.run_actions(p, p.core.join_via(via))

    def kill(self, pid: str):
        self.peers[pid].alive = False
        self.peers[pid].killed = True

    def restart(self, pid: str, via: str | None, back: int = 0) -> SimPeer:
        """The process of pid starts again (killed first if it runs) from its
        checkpoint `back` steps before the last step it held: a fresh core,
        counters at zero, its identity and its disk history kept; it joins via
        `via`, or with via=None starts as a founder (no --join: the view is
        its record's, as `peerlearn run` restarts a whole swarm)."""
        old = self.peers[pid]
        ckpt = max(0, old.step - back)
        while ckpt not in old.applied_steps:  # a checkpoint is a state it really held
            ckpt += 1
        old.alive = False
        record = old.disk_record if self.durable else None
        p = SimPeer(self, pid, via is None, self.t, record)
        p.applied_steps = old.applied_steps
        p.step, p.state = ckpt, old.applied_steps[ckpt]
        p.core.state_synced(p.step, p.state)
        self.peers[pid] = p
        self.events.append((self.now, "restart", pid, ckpt))
        self.joining.pop(pid, None)
        if via is not None:
            self.joining[pid] = via
            self.run_actions(p, p.core.join_via(via))
        self.at(self.compute, self._ready, p)
        return p

    def forge(self, src: str, dst: str, msg):
        """A member (src holds the secret) sends dst whatever it likes."""
        self.at(self.latency, self._deliver, src, dst, m.encode(msg))

    def stop(self, pid: str):
        self.peers[pid].alive = False

    def leave(self, pid: str, answer_wait: float | None = None):
        """pid stops as the daemon does on Ctrl-C: Leave, wait for a member
        that stays (Staying), record `departed` on disk, say so, then exit
        once its messages are out."""
        p = self.peers[pid]
        self.run_actions(p, p.core.leave(self.now))

        def finish():
            if not p.alive:
                return
            sends = p.core.depart(self.now)
            if sends:
                p.disk_record = p.core.record()  # durable before anyone hears
            self.run_actions(p, sends)
            self.events.append((self.now, "left", pid, p.core.departed))
            self.at(self.latency * 1.5 + self.jitter, self.stop, pid)
        self.at(3 * self.latency + 2 * self.jitter if answer_wait is None else answer_wait,
                finish)

    def partition(self, a, b):
        self.cut |= {frozenset((x, y)) for x in a for y in b}

    def heal(self):
        self.cut.clear()

    def connected(self, a: str, b: str) -> bool:
        return self.peers[a].alive and self.peers[b].alive and frozenset((a, b)) not in self.cut

    # ------------------------------------------------------------ engine

    def at(self, delay: float, fn, *args):
        heapq.heappush(self.queue, (self.now + delay, next(self.seq), fn, args))

    def run(self, until: float, tick=0.02):
        next_tick = self.now
        while True:
            t_next = self.queue[0][0] if self.queue else float("inf")
            if min(t_next, next_tick) > until:
                self.now = until
                return
            if next_tick <= t_next:
                self.now = next_tick
                next_tick += tick
                self._retry_joins()
                for p in list(self.peers.values()):
                    if p.alive:
                        self.run_actions(p, p.core.tick(self.now))
            else:
                self.now, _, fn, args = heapq.heappop(self.queue)
                fn(*args)

    def run_actions(self, p: SimPeer, actions):
        rec = p.disk_record
        if (p.core.max_round_id, p.core.term) > ((rec.max_round_id, rec.term) if rec else (0, 0)):
            p.disk_record = p.core.record()  # as the daemon: ids on disk before messages leave
        for a in actions:
            if isinstance(a, r.Send):
                delay = self.latency + (self.rng.uniform(0, self.jitter) if self.jitter else 0)
                self.at(delay, self._deliver, p.id, a.to, m.encode(a.msg))
            elif isinstance(a, r.StartCollective):
                p.contribs.round_started(a.round_id)
                self.at(self.collective_time, self._collective_end, p, a)
            elif isinstance(a, r.ApplyResult):
                if p.apply_delay and p.pending is not None and p.pending[0] == a.round_id:
                    self.events.append((self.now, "applying", p.id, a.step + 1))
                    self.at(p.apply_delay, self._apply_result, p, a)
                else:
                    self._apply_result(p, a)
            elif isinstance(a, r.DiscardResult):
                p.pending = None
                self._settle(p.contribs.round_failed(a.round_id), None)
                self.at(self.compute / 4, self._ready, p)
            elif isinstance(a, r.SyncNeeded):
                self.at(self.sync_time, self._sync, p, a)
            elif isinstance(a, r.ViewChanged):
                p.disk_record = p.core.record()  # as the daemon: a smaller view is kept
                self.events.append((self.now, "view", p.id, a.members))

    def _apply_result(self, p: SimPeer, a: r.ApplyResult) -> None:
        if not p.alive:
            return
        if p.pending is None or p.pending[0] != a.round_id:
            # Decided "apply" but our collective failed here: stay, as the
            # daemon does; the parity check fetches what the swarm applied.
            p.pending = None
            p.core.state_synced(p.step, p.state)
            self._settle(p.contribs.round_failed(a.round_id), None)
            self.at(self.compute / 4, self._ready, p)
            return
        rid, result = p.pending
        assert rid == a.round_id
        self._settle(p.contribs.round_applied(a.round_id, result), result)
        p.step = a.step + 1
        p.state = h(p.state, result)
        p.pending = None
        p.applied_steps[p.step] = p.state
        p.core.result_applied(p.step, p.state)
        p.disk_record = p.core.record()
        self.events.append((self.now, "apply", p.id, p.step))
        self.at(self.compute * p.slowdown, self._ready, p)

    def _deliver(self, src: str, dst: str, data: bytes):
        if dst not in self.peers or (src in self.peers and not self.connected(src, dst)):
            return
        try:
            msg = m.decode(data)
        except m.MessageError:
            self.rejected_wire += 1
            return
        peer = self.peers[dst]
        self.run_actions(peer, peer.core.receive(self.now, src, msg))

    def _ready(self, p: SimPeer):
        if p.alive and p.state is not None and p.pending is None:
            if p.contribs.leader is None:  # computed a new contribution
                p.contribs.submit(f"{p.id}#{next(self.seq)}")  # unique across restarts
            if p.contribs.offer() is not None:
                self.run_actions(p, p.core.local_ready(self.now, p.step, p.state))

    def _settle(self, decisions, result) -> None:
        """Each contribution ends once; an applied one with its round's result."""
        for d in decisions:
            if d.sub in self.settled:
                self.settle_errors.append(("twice", d.sub))
            self.settled[d.sub] = d.error or d.result
            if d.error is None and d.result != result:
                self.settle_errors.append(("result", d.sub))

    def _collective_end(self, p: SimPeer, a: r.StartCollective):
        if not p.alive:
            return
        if p.core.active is None or p.core.active.round_id != a.round_id:
            self._settle(p.contribs.round_failed(a.round_id), None)
            self._ready(p)  # decided (aborted) while we were at it, as the daemon retries
            return
        ok = all(self.connected(p.id, q) for q in a.participants if q != p.id)
        stallers = {q for q in a.participants if getattr(self.peers[q], "ring_staller", False)}
        if p.id in stallers:
            return  # acked, then never sends nor reports: its neighbours time out
        if ok and stallers:
            # The participants next to a staller see their transfer time out
            # and name it; the others see the abort spread around the ring.
            n, i = len(a.participants), a.participants.index(p.id)
            near = {a.participants[(i - 1) % n], a.participants[(i + 1) % n]} & stallers
            self._settle(p.contribs.round_failed(a.round_id), None)
            self.run_actions(p, p.core.collective_finished(
                self.now, a.round_id, False, blame=min(near) if near else ""))
            return
        # A poisoner's NaN reaches every participant's mean: each one's check fails.
        poisoned = ok and any(getattr(self.peers[q], "poison", False) for q in a.participants)
        ok = ok and not poisoned
        states = tuple(self.peers[q].state for q in a.participants)
        result = h(a.round_id, a.participants, states) if ok else r.ZERO_HASH
        p.pending = (a.round_id, result) if ok else None
        if not ok:  # the daemon's round task ends here: its contribution goes again
            self._settle(p.contribs.round_failed(a.round_id), None)
        self.run_actions(p, p.core.collective_finished(self.now, a.round_id, ok, result,
                                                       poisoned=poisoned))

    def _sync(self, p: SimPeer, a: r.SyncNeeded):
        if not p.alive:
            return
        for d in a.donors:
            donor = self.peers[d]
            # A donor serves the state it holds now (a restarted one may have lost it).
            if self.connected(p.id, d) and (donor.step, donor.state) == (a.step, a.state_hash):
                p.step, p.state = a.step, a.state_hash
                p.applied_steps[p.step] = p.state
                p.core.state_synced(p.step, p.state)
                p.disk_record = p.core.record()
                self._settle(p.contribs.state_replaced(StateReplaced(p.step)), None)
                self.events.append((self.now, "sync", p.id, p.step))
                # A peer that just synced enters the next round at once with a
                # zero update (as prime does), rather than chase the swarm.
                if self.ready_after_sync:
                    self.at(self.ready_after_sync, self._ready, p)
                else:
                    self._ready(p)
                return
        p.core.sync_failed()  # donor moved on: the parity check will ask again

    # ------------------------------------------------------------ checks

    def parity_violations(self) -> list:
        """(step, peers) where peers that applied or synced `step` hold different states."""
        by_step: dict[int, dict[bytes, list[str]]] = {}
        for p in self.peers.values():
            for step, state in p.applied_steps.items():
                by_step.setdefault(step, {}).setdefault(state, []).append(p.id)
        return [(s, v) for s, v in by_step.items() if len(v) > 1]

    def max_step(self, ids=None) -> int:
        return max(self.peers[i].step for i in (ids or self.peers))


# ---------------------------------------------------------------- SWIM


class SwimNet:
    """SWIM members (peerlearn/swarm/swim.py) on a simulated network, in
    simulated time (issue 19): each message takes `latency` one way plus
    U(0, jitter), is lost with probability `loss` (or always, on a cut
    directed link), and is encoded by the real encoder once per send, its
    exact length counted at both ends (decoded again with decode=True).
    Members are woken at their own next_deadline(), so a run costs the
    messages and timers it has, not N x ticks. `observe(t, observer, changed)`
    sees every view change as it happens."""

    def __init__(self, latency: float = 0.05, jitter: float = 0.0, loss: float = 0.0,
                 seed: int = 0, config=None, decode: bool = False, observe=None):
        from peerlearn.swarm import swim
        from peerlearn.wire import swim as sw
        self.swim, self.wire = swim, sw
        self.cfg = config or swim.SwimConfig()
        self.latency, self.jitter, self.loss = latency, jitter, loss
        self.rng = random.Random(seed)
        self.seed = seed
        self.decode = decode
        self.observe = observe
        self.now = 0.0
        self.queue: list = []
        self.seq = itertools.count()
        self.members: dict[str, object] = {}
        self.alive: dict[str, bool] = {}
        self.addrs: dict[str, str] = {}
        self.wake_at: dict[str, float] = {}
        self.cut: set[tuple[str, str]] = set()  # directed (src, dst) pairs that drop all
        self.slow: dict[str, float] = {}  # member -> extra delay on everything it sends
        self.sent_b: dict[str, int] = {}
        self.sent_n: dict[str, int] = {}
        self.recv_b: dict[str, int] = {}
        self.recv_n: dict[str, int] = {}
        self.by_type: dict[str, int] = {}
        self.counting = True

    def add(self, mid: str, addr: str | None = None, incarnation: int = 0,
            via: list[str] | None = None, known: list[str] | None = None):
        """A member; via: join through these members; known: start with
        these in its table as ALIVE at incarnation 0 (a swarm that starts
        together, as a restarted swarm would: no N joins at once)."""
        addr = addr or f"{mid}:7400"
        m = self.swim.SwimMember(mid, addr, self.now, random.Random(f"{self.seed}/{mid}"),
                                 self.cfg, incarnation)
        self.members[mid], self.alive[mid], self.addrs[mid] = m, True, addr
        for k in known or ():
            m.know(self.now, k, self.addrs.get(k, f"{k}:7400"))
        if via:
            self._run(mid, m.join(self.now, [(v, self.addrs[v]) for v in via]))
        else:
            self._reschedule(mid)
        return m

    def kill(self, mid: str) -> None:
        self.alive[mid] = False

    def leave(self, mid: str) -> None:
        self._run(mid, self.members[mid].leave(self.now))
        self.alive[mid] = False

    def live(self) -> list[str]:
        return [i for i, a in self.alive.items() if a]

    # ------------------------------------------------------------ engine

    def _push(self, t: float, *item) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), *item))

    def _reschedule(self, mid: str) -> None:
        m = self.members[mid]
        t = max(m.next_deadline(), self.now + 1e-6)
        if t < self.wake_at.get(mid, float("inf")) or self.wake_at.get(mid, 0) <= self.now:
            self.wake_at[mid] = t
            self._push(t, "wake", mid)

    def _run(self, mid: str, actions) -> None:
        swim = self.swim
        for a in actions:
            if isinstance(a, swim.Send):
                self._send(mid, a.to, a.msg)
            elif isinstance(a, swim.Changed) and self.observe is not None:
                self.observe(self.now, mid, a)
        if self.alive[mid]:
            self._reschedule(mid)

    def _send(self, src: str, dst: str, msg) -> None:
        data = self.wire.encode(msg)
        n = len(data)
        if self.counting:
            self.sent_b[src] = self.sent_b.get(src, 0) + n
            self.sent_n[src] = self.sent_n.get(src, 0) + 1
            name = type(msg).__name__
            self.by_type[name] = self.by_type.get(name, 0) + n
        if (src, dst) in self.cut or (self.loss and self.rng.random() < self.loss):
            return
        delay = self.latency + (self.rng.uniform(0, self.jitter) if self.jitter else 0.0)
        self._push(self.now + delay + self.slow.get(src, 0.0), "msg", src, dst, msg, data)

    def run(self, until: float) -> None:
        while self.queue and self.queue[0][0] <= until:
            t, _, what, *rest = heapq.heappop(self.queue)
            self.now = t
            if what == "wake":
                mid = rest[0]
                if self.wake_at.get(mid) != t or not self.alive[mid]:
                    continue
                self._run(mid, self.members[mid].tick(t))
            else:
                src, dst, msg, data = rest
                if not self.alive.get(dst, False):
                    continue
                if self.counting:
                    self.recv_b[dst] = self.recv_b.get(dst, 0) + len(data)
                    self.recv_n[dst] = self.recv_n.get(dst, 0) + 1
                got = self.wire.decode(data) if self.decode else msg
                self._run(dst, self.members[dst].receive(t, src, got))
        self.now = max(self.now, until)
