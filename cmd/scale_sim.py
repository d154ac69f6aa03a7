"""Today's swarm design at N peers, simulated (issue 19; docs/swarm.md, "Scale:
today's design in simulation", has the table this prints and what it means).

    python cmd/scale_sim.py --peers 16,64,256,1024 --rtt-ms 100 --churn-per-min 0.01 \\
        --sim-seconds 1200,180,8,0 --max-wall-s 600 --json

N peers run the real sans-IO core (`RoundCore`) in tests/swarm_sim.py's
simulated time. Modelled: a one-way latency of RTT/2 (plus optional uniform
jitter); the ring all-reduce of a round as 2(P-1) sequential steps of one
latency plus (state/P)/bandwidth each; a state sync as one RTT plus
state/bandwidth; churn as two Poisson processes, kills of a random live
peer and joins of a new one via a random live member, each at
churn-per-min x N per minute. Measured: every control message is encoded
by the real encoder once per distinct message object (a broadcast is one
object) and its exact length counted at sender and receiver; round
proposals, commits, decisions and each peer's ApplyResult come from the
cores; one peer joins 0.25 s into the window, and one member (not the
coordinator) is killed 6 s before its end and timed until every live
peer's core holds it dead (--no-probes: neither).

The swarm starts as a view of all N peers at epoch 1 (every core built from
the same applied record, as a whole swarm restarting would be), so the
window measures the steady state rather than N joins at once. The cores'
cost grows as N^2 per peer, so a window of 0 s gives the formulas alone
(`extrapolate`), as the 1,024-peer row uses.

`--membership swim` runs the new membership alone instead (peerlearn/swarm/
swim.py, no rounds; `simulate_swim` says what it measures):

    python cmd/scale_sim.py --membership swim --peers 16,64,256,1024 \\
        --sim-seconds 1200,600,600,600 --json
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from swarm_sim import Sim, SimPeer, SwimNet  # noqa: E402

from peerlearn.swarm import rounds as r  # noqa: E402
from peerlearn.wire import control as m  # noqa: E402

ROUND_MESSAGES = {"Ready", "Propose", "Ack", "Commit", "Done", "Apply", "Abort"}
JOIN_MESSAGES = {"Join", "Welcome"}


def kind(msg) -> str:
    name = type(msg).__name__
    if name == "Heartbeat":
        return "heartbeat"
    return "round" if name in ROUND_MESSAGES else "join" if name in JOIN_MESSAGES else "other"


def peer_info(i: int) -> m.PeerInfo:
    """Ids as the daemon makes them (32 hex digits of a key hash, so the
    coordinator is a random peer) and IPv4 addresses: message sizes as on
    the wire."""
    pid = hashlib.sha256(b"scale-sim-%d" % i).hexdigest()[:32]
    host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
    return m.PeerInfo(pid, f"{host}:7400", f"{host}:7401")


class ScaleSim(Sim):
    def __init__(self, n: int, timeouts: r.Timeouts, rtt: float, state_bytes: float,
                 bandwidth_bps: float, compute: float, jitter: float = 0.0, seed: int = 0,
                 decode: bool = False):
        super().__init__(1, timeouts=timeouts, latency=rtt / 2, compute=compute,
                         sync_time=rtt + 8 * state_bytes / bandwidth_bps, jitter=jitter,
                         seed=seed)
        self.rtt, self.state_bytes, self.bandwidth = rtt, state_bytes, bandwidth_bps
        self.decode = decode
        self.queue.clear()
        self.peers.clear()
        self.infos: dict[str, m.PeerInfo] = {}
        self.next_index = 0
        founders = [self._new_info() for _ in range(n)]
        record = r.Applied(1, tuple(founders), 1, 1, 0, r.ZERO_HASH)
        for info in founders:
            self._make(info.id, True, record)
            self.at(compute, self._ready, self.peers[info.id])
        self.counting = False
        self.sent_b: Counter = Counter()  # (pid, kind) -> bytes, during the window
        self.sent_n: Counter = Counter()
        self.recv_b: Counter = Counter()
        self.recv_n: Counter = Counter()
        self.sizes: dict[str, list[int]] = {}  # message type -> encoded sizes seen
        self.by_type: Counter = Counter()  # message type -> bytes sent, all peers
        self.proposed: dict[int, float] = {}  # round id -> first Propose sent
        self.committed: dict[int, float] = {}
        self.aborted_ids: dict[int, float] = {}  # round id -> Abort sent
        self.applied: dict[int, list[float]] = {}  # round id -> each ApplyResult's time
        self.participants: dict[int, int] = {}
        self.join_at: dict[str, float] = {}
        self.welcomed_at: dict[str, float] = {}
        self.kills = self.joins = 0
        self._next_tick = 0.0
        self.watch = None  # (victim, killed at, {peer: detected at})

    def _new_info(self) -> m.PeerInfo:
        info = peer_info(self.next_index)
        self.next_index += 1
        self.infos[info.id] = info
        return info

    def _make(self, pid: str, founder: bool, record=None) -> SimPeer:
        p = SimPeer(self, pid, founder, self.t, record)
        p.core = r.RoundCore(self.infos[pid], self.t, founder=founder, record=record)
        self.peers[pid] = p
        return p

    def add(self, pid: str, founder=False) -> SimPeer:
        if pid not in getattr(self, "infos", ()):
            return super().add(pid, founder)  # Sim.__init__'s founder, dropped at once
        return self._make(pid, founder)

    def ring_time(self, p: int) -> float:
        """2(P-1) sequential steps, each one latency plus a chunk of state/P
        at the per-peer bandwidth."""
        if p <= 1:
            return 0.0
        return 2 * (p - 1) * (self.latency + 8 * self.state_bytes / p / self.bandwidth)

    # ------------------------------------------------------------ engine

    def run(self, until: float, tick: float = 0.05) -> None:
        """Sim.run, but the tick clock persists across calls (no double
        ticks at each call's start) and the watch is checked every tick."""
        while True:
            t_next = self.queue[0][0] if self.queue else float("inf")
            if min(t_next, self._next_tick) > until:
                self.now = until
                return
            if self._next_tick <= t_next:
                self.now = self._next_tick
                self._next_tick += tick
                self._retry_joins()
                for p in list(self.peers.values()):
                    if p.alive:
                        self.run_actions(p, p.core.tick(self.now))
                if self.watch is not None:
                    self._check_watch()
            else:
                self.now, _, fn, args = heapq.heappop(self.queue)
                fn(*args)

    def run_actions(self, p: SimPeer, actions) -> None:
        rest = []
        batch: dict[int, tuple[object, list[str]]] = {}
        for a in actions:
            if isinstance(a, r.Send):
                batch.setdefault(id(a.msg), (a.msg, []))[1].append(a.to)
                continue
            if isinstance(a, r.StartCollective):
                self.collective_time = self.ring_time(len(a.participants))
            elif isinstance(a, r.ApplyResult):
                self.applied.setdefault(a.round_id, []).append(self.now)
            rest.append(a)
        for msg, dsts in batch.values():
            self._send(p.id, msg, dsts)
        if rest:
            super().run_actions(p, rest)

    def _send(self, src: str, msg, dsts: list[str]) -> None:
        data = m.encode(msg)
        name, k = type(msg).__name__, kind(msg)
        if self.counting:
            self.sizes.setdefault(name, []).append(len(data))
            self.sent_b[src, k] += len(data) * len(dsts)
            self.sent_n[src, k] += len(dsts)
            self.by_type[name] += len(data) * len(dsts)
            if name == "Propose" or (name == "Commit" and msg.fast):
                # A fast Commit is its round's proposal (no Propose before it).
                self.proposed.setdefault(msg.round_id, self.now)
                self.participants[msg.round_id] = len(msg.participants)
            if name == "Commit":
                self.committed.setdefault(msg.round_id, self.now)
            elif name == "Abort":
                self.aborted_ids.setdefault(msg.round_id, self.now)
        if self.jitter:
            for d in dsts:
                self.at(self.latency + self.rng.uniform(0, self.jitter), self._arrive,
                        src, [d], msg, data)
        else:
            self.at(self.latency, self._arrive, src, dsts, msg, data)

    def _arrive(self, src: str, dsts: list[str], msg, data: bytes) -> None:
        k = kind(msg)
        for dst in dsts:
            peer = self.peers.get(dst)
            if peer is None or (src in self.peers and not self.connected(src, dst)):
                continue
            got = m.decode(data) if self.decode else msg
            if self.counting:
                self.recv_b[dst, k] += len(data)
                self.recv_n[dst, k] += 1
            self.run_actions(peer, peer.core.receive(self.now, src, got))

    def _retry_joins(self) -> None:
        for pid in self.joining:
            if pid not in self.welcomed_at and self.peers[pid].core.members:
                self.welcomed_at[pid] = self.now
        super()._retry_joins()

    # ------------------------------------------------------------ churn

    def live(self) -> list[str]:
        return [i for i, p in self.peers.items() if p.alive]

    def start_churn(self, per_min: float, rng: random.Random) -> None:
        rate = per_min * len(self.live()) / 60.0  # events per second, each kind
        if rate <= 0:
            return

        def kill():
            spare = [i for i in self.live() if self.watch is None or i != self.watch[0]]
            if len(spare) > 1:
                self.kill(rng.choice(sorted(spare)))
                self.kills += 1
            self.at(rng.expovariate(rate), kill)

        def join():
            contacts = sorted(i for i in self.live() if self.peers[i].core.members)
            if contacts:
                pid = self._new_info().id
                self.join_at[pid] = self.now
                self.join(pid, via=rng.choice(contacts))
                self.joins += 1
            self.at(rng.expovariate(rate), join)
        self.at(rng.expovariate(rate), kill)
        self.at(rng.expovariate(rate), join)

    def probe_join(self, rng: random.Random) -> None:
        """One joiner whatever the churn rate, so entry time is measured at every N."""
        contacts = sorted(i for i in self.live() if self.peers[i].core.members)
        pid = self._new_info().id
        self.join_at[pid] = self.now
        self.join(pid, via=rng.choice(contacts))

    def watch_kill(self, rng: random.Random) -> None:
        """Kill one member that is not the coordinator and time its detection."""
        coord = self.peers[sorted(self.live())[0]].core.coordinator(self.now)
        victims = sorted(i for i in self.live() if i != coord and i not in self.joining)
        victim = rng.choice(victims)
        self.kill(victim)
        self.watch = (victim, self.now, {})

    def _check_watch(self) -> None:
        victim, _, seen = self.watch
        for i, p in self.peers.items():
            if p.alive and i not in seen and i not in self.joining and \
                    not p.core.alive(victim, self.now):
                seen[i] = self.now

    def detection(self) -> dict:
        victim, t0, seen = self.watch
        watchers = [i for i, p in self.peers.items() if p.alive and i not in self.joining
                    and self.join_at.get(i, -1) < t0]
        missing = [i for i in watchers if i not in seen]
        out_of_view = all(victim not in self.peers[i].core.members for i in watchers)
        last = max((seen[i] for i in watchers if i in seen), default=None)
        return {"all_live_peers_hold_it_dead_s": None if missing or last is None
                else round(last - t0, 3),
                "first_s": round(min(seen.values()) - t0, 3) if seen else None,
                "undetected_at_end": len(missing),
                "out_of_every_view_at_end": out_of_view}


# ---------------------------------------------------------------- report


def _median(xs):
    return round(statistics.median(xs), 3) if xs else None


def wire_sizes(n: int) -> dict[str, int]:
    """Each control message's encoded size in an N-peer swarm (a round's
    Propose names every participant, its Commit and a Welcome every member)."""
    infos = tuple(peer_info(i) for i in range(n))
    # Counters of a swarm some thousand rounds old (msgpack: 3-byte ints).
    ids, h, k = tuple(sorted(p.id for p in infos)), b"\x5a" * 8, 1000
    msgs = [m.Heartbeat(k, k - 1, k, k, h, True, infos[0], False, ids[0]),
            m.Ready(k, h, infos[0]), m.Propose(k, k, k, h, ids), m.Ack(k, k),
            m.Commit(k, k, k, ids, infos), m.Done(k, True, h), m.Apply(k),
            m.Join(infos[0]), m.Welcome(k, k, infos)]
    return {type(x).__name__: len(m.encode(x)) for x in msgs}


def args_ack(args) -> float:
    return r.Timeouts.for_dead_after(args.dead_after).ack


def extrapolate(n: int, args) -> dict:
    """Formulas for today's design with no failure inside a round, from the
    encoded sizes at N (wire_sizes). The simulated windows check them at
    small N; at large N they stand in for what the simulator cannot afford."""
    rtt, hb = args.rtt_ms / 1000, r.Timeouts.for_dead_after(args.dead_after).heartbeat_every
    state, bw = args.state_mb * 1e6 * 8, args.bandwidth_mbit * 1e6
    size = wire_sizes(n)
    bandwidth_term = 2 * (n - 1) / n * state / bw if n > 1 else 0.0
    ring = 2 * (n - 1) * rtt / 2 + bandwidth_term
    # A steady round repeats the last one: a fast Commit, no Propose or Ack.
    round_s = 1.5 * rtt + ring  # Commit, ring, Done, Apply
    period = args.compute_s + 0.5 * rtt + round_s  # Apply -> compute -> Ready -> next round
    beat = 2 * (n - 1) / hb  # in and out, per peer per second
    sync = 2 * rtt + state / bw
    # While the ring runs, the leader sends the Commit again to every
    # participant not yet Done once per ack timeout (coordinating._resend_commit):
    # k copies per member and round. (Members used to hand each back, once
    # per ack timeout; a Heartbeat's `holding` now tells them the leader runs it.)
    k = 1 + math.floor((ring + rtt) / args_ack(args))
    member_round = 2 * (n - 1) * (size["Ready"] + size["Done"]) + \
        k * size["Commit"] + size["Apply"]
    coord_round = 2 * (n - 1) * (size["Ready"] + size["Done"]) + (n - 1) * (
        k * size["Commit"] + size["Apply"])
    return {
        "heartbeat_bytes_per_s_per_peer": round(beat * size["Heartbeat"]),
        "round_bytes_per_s_per_member": round(member_round / period),
        "round_bytes_per_s_coordinator": round(coord_round / period),
        "busiest_msgs_per_s": round(beat + (5 + k) * (n - 1) / period),
        "commit_copies_per_member_and_round": k,
        "detection_s": f"{args.dead_after - hb:g}..{args.dead_after + rtt / 2:g}",
        "round_s": round(round_s, 2), "round_rtts": round(round_s / rtt, 1),
        "round_rtts_beside_bandwidth": round((round_s - bandwidth_term) / rtt, 1),
        "round_period_s": round(period, 2),
        # Join/Welcome, a state sync, then the next round that applies: one
        # proposal away at best, a whole period at worst, if rounds apply.
        "joiner_entry_s": f"{sync + round_s:.3g}..{sync + period + round_s:.3g}",
        # A round fails when one of its N participants is killed in it.
        "applied_fraction": float(f"{math.exp(-args.churn_per_min / 60 * n * round_s):.3g}"),
        "wire_bytes": size,
    }


def report(sim: ScaleSim, n: int, t0: float, t1: float, kill_at: float) -> dict:
    span = t1 - t0
    steady = [i for i, p in sim.peers.items() if p.alive and i not in sim.join_at]
    kinds = ("heartbeat", "round", "join", "other")

    def per_peer(counters, k):
        return sum(c[i, k] for i in steady for c in counters) / len(steady) / span

    traffic = {k: round(per_peer((sim.sent_b, sim.recv_b), k)) for k in kinds}
    traffic["total"] = sum(traffic.values())
    load = Counter()
    for c in (sim.sent_n, sim.recv_n):
        for (i, _), v in c.items():
            load[i] += v
    busiest, msgs = load.most_common(1)[0] if load else (None, 0)
    coord = sim.peers[steady[0]].core.coordinator(sim.now) if steady else None
    # Rounds decided before the detection probe's kill: that kill is not churn.
    decided, later = {}, sorted(sim.proposed.items())
    for k, (rid, _) in enumerate(later):
        if rid in sim.applied:
            decided[rid] = (min(sim.applied[rid]), True)
        elif rid in sim.aborted_ids:
            decided[rid] = (sim.aborted_ids[rid], False)
        elif k + 1 < len(later):  # never committed: proposed again without a non-acker
            decided[rid] = (later[k + 1][1], False)
    proposed = [rid for rid, t in sim.proposed.items() if t < kill_at]
    decided = {rid: ok for rid, (t, ok) in decided.items() if t < kill_at}
    applied = [rid for rid, ok in decided.items() if ok]
    lat = [max(sim.applied[rid]) - sim.proposed[rid] for rid in applied]
    # The ring's bandwidth term, 2(P-1)/P x state/bandwidth: the goal counts
    # round trips beside it.
    bw = [2 * (sim.participants[rid] - 1) / sim.participants[rid] * 8 * sim.state_bytes /
          sim.bandwidth for rid in applied]
    first_apply, first_sync = {}, {}
    for t, what, pid, *_ in sim.events:
        if pid in sim.join_at:
            book = first_apply if what == "apply" else first_sync if what == "sync" else None
            if book is not None:
                book.setdefault(pid, t)
    entry = [first_apply[p] - sim.join_at[p] for p in sim.join_at if p in first_apply]
    return {
        "simulated_s": round(span, 2), "kills": sim.kills, "joins": sim.joins,
        "membership_bytes_per_s_per_peer": traffic,
        "sent_bytes_per_s_per_peer_by_type": {k: round(v / span / n)
                                              for k, v in sim.by_type.most_common()},
        "busiest_peer_msgs_per_s": round(msgs / span, 1),
        "busiest_is_coordinator": busiest == coord,
        "dead_peer_detection": sim.detection() if sim.watch else None,
        "rounds_proposed": len(proposed), "rounds_decided": len(decided),
        "rounds_applied": len(applied),
        "applied_fraction": round(len(applied) / len(decided), 3) if decided else None,
        "round_latency_s_median": _median(lat),
        "round_latency_s_max": round(max(lat), 3) if lat else None,
        "round_latency_rtts_median": round(_median(lat) / sim.rtt, 1) if lat else None,
        "round_rtts_beside_bandwidth_median":
            round(_median([x - b for x, b in zip(lat, bw)]) / sim.rtt, 1) if lat else None,
        "joiners": len(sim.join_at), "joiners_entered": len(entry),
        "joiner_welcome_s_median": _median([sim.welcomed_at[p] - sim.join_at[p]
                                            for p in sim.welcomed_at if p in sim.join_at]),
        "joiner_synced_s_median": _median([first_sync[p] - sim.join_at[p] for p in first_sync]),
        "joiner_first_applied_round_s_median": _median(entry),
    }


def simulate(n: int, args, seconds: float) -> dict:
    timeouts = r.Timeouts.for_dead_after(args.dead_after)
    out = {"peers": n, "rtt_ms": args.rtt_ms, "jitter_ms": args.jitter_ms,
           "state_mb": args.state_mb, "bandwidth_mbit": args.bandwidth_mbit,
           "compute_s": args.compute_s, "churn_per_min": args.churn_per_min,
           "timeouts": {k: getattr(timeouts, k) for k in
                        ("heartbeat_every", "dead_after", "gather", "ack", "collective")},
           "measured": None, "extrapolated": extrapolate(n, args)}
    if seconds <= 0:
        return out
    sim = ScaleSim(n, timeouts, args.rtt_ms / 1000, args.state_mb * 1e6,
                   args.bandwidth_mbit * 1e6, args.compute_s, args.jitter_ms / 1000,
                   args.seed, decode=args.decode)
    rng = random.Random(args.seed + 1)
    started = time.monotonic()
    sim.run(args.warmup_s)
    sim.counting = True
    t0 = sim.now
    sim.start_churn(args.churn_per_min, rng)
    end = t0 + seconds
    # Late in the window, so the rounds before it measure churn alone; early
    # enough for the detection to finish inside it.
    kill_at = t0 + max(min(1.0, seconds / 4), seconds - 2 * args.dead_after)
    sim.run(t0 + 0.25)
    if args.probes:
        sim.probe_join(rng)
    else:
        kill_at = end
    while sim.now < end:
        sim.run(min(end, sim.now + 0.25))
        if args.probes and sim.watch is None and sim.now >= kill_at:
            sim.watch_kill(rng)
        wall = time.monotonic() - started
        if args.progress:
            print(f"[{n}] sim {sim.now - t0:.2f}/{seconds:g} s, wall {wall:.0f} s",
                  file=sys.stderr, flush=True)
        if wall > args.max_wall_s:
            break  # the window ends early: simulated_s says how long it was
    wall = time.monotonic() - started
    out["measured"] = report(sim, n, t0, sim.now, kill_at)
    # The cores' CPU and the simulator's together, on this machine: what one
    # peer's core would spend per second of real time, as an upper bound.
    out["measured"]["sim_cpu_s_per_peer_per_s"] = round(wall / n / sim.now, 4)
    out["measured"]["wall_s"] = round(wall, 1)
    return out


# ---------------------------------------------------------------- SWIM


def swim_config(args):
    from peerlearn.swarm.swim import SwimConfig
    return SwimConfig(period=args.swim_period, probe_timeout=args.swim_period / 2)


def simulate_swim(n: int, args, seconds: float) -> dict:
    """N SwimMembers (peerlearn/swarm/swim.py) on tests/swarm_sim.py's
    SwimNet: one-way latency RTT/2 (+ jitter), message loss --loss, churn
    as for today's design (kills of a random live member and joins of a new
    one via a random live member, each churn-per-min x N a minute), and one
    more kill 60 % into the window and one more join 0.25 s into it (churn
    spares that joiner). Every member starts knowing the other
    N - 1 (as today's sim starts from one view). Measured during the window:
    bytes in and out of every member (the real encoder's lengths), messages
    in and out of the busiest; after it, churn stops and the run goes on
    (uncounted) until every kill of the window is confirmed everywhere or
    two longest suspicion timeouts pass. For each kill, the time until every
    member that was live then, knew the victim, and is live at the end holds
    it dead; for each join, the time until every such member holds the
    joiner alive."""
    cfg = swim_config(args)
    rtt = args.rtt_ms / 1000
    dead_seen: dict[str, dict[str, float]] = {}  # victim -> watcher -> confirmed at
    alive_seen: dict[str, dict[str, float]] = {}  # joiner -> watcher -> alive at
    false_dead: list[tuple[float, str, str]] = []
    net = None

    def observe(t, who, c):
        if c.state in ("dead", "left"):
            if c.member in dead_seen:
                dead_seen[c.member].setdefault(who, t)
            elif net.alive.get(c.member):
                false_dead.append((t, who, c.member))
        elif c.state == "alive" and c.member in alive_seen:
            alive_seen[c.member].setdefault(who, t)

    net = SwimNet(latency=rtt / 2, jitter=args.jitter_ms / 1000, loss=args.loss, seed=args.seed,
                  config=cfg, decode=args.decode, observe=observe)
    infos = [peer_info(i) for i in range(n)]
    next_index = n
    everyone = [i.id for i in infos]
    for info in infos:
        net.addrs[info.id] = info.control
    for info in infos:
        net.add(info.id, info.control, known=everyone)
    rng = random.Random(args.seed + 1)
    started = time.monotonic()
    warmup = max(args.warmup_s, 2 * cfg.period)
    net.counting = False
    net.run(warmup)
    net.counting = True
    t0 = net.now
    end = t0 + seconds
    kills: list[tuple[str, float, list[str]]] = []  # victim, at, watchers
    joins: list[tuple[str, float, list[str]]] = []

    def kill(victim: str) -> None:
        watchers = [i for i in net.live() if i != victim
                    and net.members[i].state_of(victim) in ("alive", "suspect")]
        net.kill(victim)
        dead_seen[victim] = {}
        kills.append((victim, net.now, watchers))

    spared: set[str] = set()  # the probe joiner: churn does not kill it

    def join() -> str:
        nonlocal next_index
        info = peer_info(next_index)
        next_index += 1
        via = rng.choice(sorted(net.live()))
        alive_seen[info.id] = {}
        joins.append((info.id, net.now, list(net.live())))
        net.add(info.id, info.control, via=[via])
        return info.id

    rate = args.churn_per_min * n / 60.0
    events = []  # (time, what)
    if rate > 0:
        for what in ("kill", "join"):
            t = t0 + rng.expovariate(rate)
            while t < end:
                events.append((t, what))
                t += rng.expovariate(rate)
    if args.probes:
        events.append((t0 + 0.6 * seconds, "kill"))
        events.append((t0 + 0.25, "join"))
    events.sort()
    for t, what in events:
        net.run(t)
        if what == "kill" and len(net.live()) > 2:
            kill(rng.choice(sorted(set(net.live()) - spared)))
        elif what == "join":
            joiner = join()
            if not spared and t == t0 + 0.25:
                spared.add(joiner)
        if time.monotonic() - started > args.max_wall_s:
            break
    net.run(end)
    span = net.now - t0
    net.counting = False
    # Let the window's kills be confirmed (not counted as traffic).
    tail_until = net.now + 2 * cfg.suspicion_max(n) + 2 * cfg.period * math.log2(n + 1)
    while net.now < tail_until:
        net.run(net.now + 5.0)
        pending = [v for v, _, ws in kills
                   if any(net.alive[x] and x not in dead_seen[v] for x in ws)]
        if not pending:
            break
    wall = time.monotonic() - started

    steady = [i for i in everyone if net.alive[i]]
    per_peer = [(net.sent_b.get(i, 0) + net.recv_b.get(i, 0)) / span for i in steady]
    msgs = {i: (net.sent_n.get(i, 0) + net.recv_n.get(i, 0)) / span for i in net.members}
    busiest = max(msgs, key=msgs.get) if msgs else None
    detect, undetected = [], 0
    for victim, at, watchers in kills:
        ws = [x for x in watchers if net.alive[x]]
        if all(x in dead_seen[victim] for x in ws):
            detect.append(max((dead_seen[victim][x] for x in ws), default=at) - at)
        else:
            undetected += 1
    first = [min(d.values()) - at for (v, at, _), d in
             ((k, dead_seen[k[0]]) for k in kills) if d]
    entry, not_entered = [], 0
    for joiner, at, watchers in joins:
        if not net.alive[joiner]:
            continue  # killed by churn itself (counted in kills)
        ws = [x for x in watchers if net.alive[x]]
        if all(x in alive_seen[joiner] for x in ws):
            entry.append(max((alive_seen[joiner][x] for x in ws), default=at) - at)
        else:
            not_entered += 1
    sizes = {name: round(b / span / n, 1) for name, b in
             sorted(net.by_type.items(), key=lambda kv: -kv[1])}
    return {
        "peers": n, "membership": "swim", "rtt_ms": args.rtt_ms, "jitter_ms": args.jitter_ms,
        "loss": args.loss, "churn_per_min": args.churn_per_min,
        "swim": {"period_s": cfg.period, "probe_timeout_s": cfg.probe_timeout,
                 "indirect": cfg.indirect, "max_piggyback": cfg.max_piggyback,
                 "retransmits_per_update": cfg.retransmits(n),
                 "suspicion_s": [round(cfg.suspicion_min(n), 2),
                                 round(cfg.suspicion_max(n), 2)],
                 "detection_bound_s": round((2 * (n - 1) + 1) * cfg.period +
                                            cfg.suspicion_max(n), 1)},
        "measured": {
            "simulated_s": round(span, 2), "kills": len(kills), "joins": len(joins),
            "membership_bytes_per_s_per_peer": {
                "mean": round(statistics.mean(per_peer)) if per_peer else None,
                "max": round(max(per_peer)) if per_peer else None},
            "sent_bytes_per_s_per_peer_by_type": sizes,
            "busiest_peer_msgs_per_s": round(msgs[busiest], 1) if busiest else None,
            "mean_peer_msgs_per_s": round(statistics.mean(msgs[i] for i in steady), 2)
            if steady else None,
            "dead_peer_held_dead_by_all_s": {
                "median": _median(detect), "max": round(max(detect), 2) if detect else None,
                "first_confirmation_median": _median(first),
                "kills_measured": len(detect), "undetected": undetected},
            "joiner_known_by_all_s": {"measured": len(entry), "median": _median(entry),
                                      "max": round(max(entry), 2) if entry else None,
                                      "not_known_by_all": not_entered},
            "false_dead": len(false_dead),
            "false_dead_members": len({m for _, _, m in false_dead}),
            "wall_s": round(wall, 1),
        },
    }


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="16,64,256,1024")
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform extra one-way delay")
    ap.add_argument("--churn-per-min", type=float, default=0.01,
                    help="fraction of peers killed, and joining, per minute")
    ap.add_argument("--sim-seconds", default="30",
                    help="simulated window, one value or one per --peers entry")
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--state-mb", type=float, default=1.0)
    ap.add_argument("--bandwidth-mbit", type=float, default=100.0)
    ap.add_argument("--compute-s", type=float, default=1.0,
                    help="each peer's compute between an applied round and its next Ready")
    ap.add_argument("--dead-after", type=float, default=3.0, help="`peerlearn run`'s default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode", action="store_true",
                    help="decode every delivery with the real decoder (slower)")
    ap.add_argument("--no-probes", dest="probes", action="store_false",
                    help="no detection kill and no probe joiner: churn alone")
    ap.add_argument("--max-wall-s", type=float, default=540.0, help="per N")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--membership", choices=("today", "swim"), default="today",
                    help="today: RoundCore's all-to-all heartbeats and rounds; swim: the "
                    "membership of peerlearn/swarm/swim.py alone (no rounds)")
    ap.add_argument("--swim-period", type=float, default=1.0,
                    help="swim: protocol period in seconds (probe timeout: half of it)")
    ap.add_argument("--loss", type=float, default=0.0,
                    help="swim: probability that any one message is lost")
    ap.add_argument("--json", action="store_true", help="one JSON object per N (the default)")
    args = ap.parse_args(argv)
    args.ns = [int(x) for x in args.peers.split(",")]
    args.secs = [float(x) for x in args.sim_seconds.split(",")]
    if len(args.secs) == 1:
        args.secs *= len(args.ns)
    if len(args.secs) != len(args.ns):
        ap.error("--sim-seconds: one value, or one per --peers entry")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    run = simulate_swim if args.membership == "swim" else simulate
    for n, s in zip(args.ns, args.secs):
        print(json.dumps(run(n, args, s)), flush=True)


if __name__ == "__main__":
    main()
