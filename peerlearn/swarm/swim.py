"""SWIM membership with Lifeguard-style suspicion, sans-IO (issue 19).

The daemon runs it beside its heartbeats with `peerlearn run --swim`
(swim_driver.py), observed only: RoundCore still heartbeats every member and
decides liveness from them (docs/swarm.md, "SWIM between real peers", says
what wiring it in takes). cmd/scale_sim.py --membership swim runs it at up to
1,024 members.

A `SwimMember` is driven by its owner with the time: `receive(now, src, msg)`
for a message (src: the sender's id as the authenticated transport knows
it), `tick(now)` at least by `next_deadline()`, `join(now, seeds)` and
`leave(now)`. Each returns a list of actions: `Send(to, addr, msg)` (addr
"" means: answer on the connection it came from) and `Changed(member,
state, incarnation, addr, by_me)` when this member's view of one changes.
No sockets, threads or clocks; given the same seeded `random.Random`, the
same calls give the same actions. Messages and their encoding:
peerlearn/wire/swim.py.

The protocol (Das et al. 2002, "SWIM"; Dadgar et al. 2018, "Lifeguard"):

* Every protocol period T (`period`, 1 s) a member probes one other member,
  taken in a shuffled round-robin order (a new shuffle per pass; a member
  that joins is put at a random place in the rest of the pass). No Ack
  within `probe_timeout`: it asks `indirect` (k) others to probe the target
  for it (PingReq; they answer Ack, or Nack if the target is silent to them
  too). No Ack by the end of the period: the target is SUSPECT.
* Updates (member, incarnation, state) travel piggybacked on Pings, Acks
  and PingReqs: at most `max_piggyback` a message, the least sent first,
  each sent `retransmit_mult * ceil(log10(n + 1))` times by every member
  that learns it (lambda log n), then dropped. A newer update about a
  member replaces the queued older one. A probe of a member held suspect or
  dead carries that record first (Lifeguard's buddy system), so the member
  hears of it at once.
* A member that hears itself suspected or dead raises its incarnation and
  gossips ALIVE at the new one (refutation); (incarnation, state) orders
  updates about one member, higher wins, and at one incarnation DEAD/LEFT >
  SUSPECT > ALIVE. So only the member itself can end a suspicion of it.
* A suspicion ends in DEAD (confirmed) after a timeout that starts at
  `suspicion_max_mult` x the minimum and shrinks, as independent members
  suspect the same incarnation, towards the minimum `suspicion_mult x
  max(1, log10 n) x T`, reached at `confirmations` others (Lifeguard's
  LHA-suspicion). A confirmed DEAD spreads as an update and is taken at once.
* A member that holds a suspicion nobody else has confirmed asks the
  suspect directly once, halfway through the timeout (a Ping carrying the
  suspicion): a live one refutes on its Ack. Without it, a suspicion that
  reached a member late, after the refutation's gossip had run out, ran to
  DEAD (seen once at 1,024 members and 5 % loss).
* Local health (Lifeguard's LHA-probe): a member that fails a probe without
  the Nacks it asked for, or has to refute a suspicion of itself, raises a
  multiplier (up to `max_health`) that stretches its own period and probe
  timeout; each successful probe lowers it. A slow member accuses less.
* A dead member is kept `dead_keep` seconds (so stale ALIVE updates cannot
  bring it back) and probed now and then (`reprobe_every` periods, one
  dead member in turn, no suspicion): if it was wrongly confirmed (a healed
  partition) it hears so and refutes, and comes back.
* Joining: Join to a seed, which adds the joiner, gossips it, and answers
  with its table in Members messages (at most `max_syncs_per_period`
  answers a period, so Join floods cannot make it send without bound).
  Gossip can miss a member (each update is sent a bounded number of times),
  so a member's Ping carries its own ALIVE until that target has acked one
  at its current incarnation: every member learns of a joiner (or of a
  refutation) within one pass of the joiner's round robin at the latest.

What a member guarantees, n the members it knows, T the period, delays
below `probe_timeout / 2` each way (tests/test_swim.py checks each, 1 to 3
also in its property test over random fault schedules):

1. Completeness, deterministic: a member that crashes is confirmed DEAD by
   every live member x within 2(n-1)T + T + suspicion_max(n) of the crash
   (or of the last ALIVE update about it that x receives): x's own round
   robin reaches it within two passes, and x's own suspicion timer needs
   nobody else. With high probability much sooner: some member probes it
   within a few periods (each period each of n-1 members picks it with
   probability ~1/(n-1)), the timeout shrinks to the minimum as others
   confirm, and DEAD reaches everyone in O(log n) periods.
2. Accuracy when it answers: a member whose every link (both ways, to every
   member) delivers within probe_timeout / 2 is never suspected by anyone:
   every probe of it is acked in time, and only a failed probe starts a
   suspicion. A member is confirmed DEAD by the member that confirms it
   only after being held SUSPECT by that member, at the same incarnation
   and with no newer update, for at least the suspicion timeout (never
   less than suspicion_mult x T); the others take the confirmation as news.
   What is not guaranteed: a live member whose links lose messages can be
   confirmed dead if its refutation does not reach the suspecting members
   within the timeout (SWIM's trade); it then refutes and comes back once it
   hears (the buddy record on reprobes), while its dead entry is kept.
3. Bounded state: at most `max_members` table entries (a full table drops
   new members; the oldest dead entry goes first), one queued update per
   member (and per confirming suspector, at most `confirmations` + 1),
   `max_relays` indirect probes in flight for others, one own probe, and
   `max_syncs_per_period` table answers a period. Whatever a stranger sends,
   it can fill the table up to the cap and no further.
4. A joiner that reaches its seed is known to every live member within
   2(n-1)T + T of its Join, deterministically (its own Pings), and within
   O(log n) periods with high probability (gossip).
5. Messages per period, O(1): one Ping out and its Ack in, k PingReqs
   only after a missed Ack, one reprobe of a dead member every
   `reprobe_every` periods, one check Ping per suspicion nobody else
   confirms; in expectation one Ping in (answered) and k/n PingReqs in. Bytes per
   message: a header (8 bytes, 26 for a PingReq) plus at most
   `max_piggyback` updates; with the daemon's 16-byte ids, IPv4 addresses
   and incarnations below 2^32 an update is at most 47 bytes (ALIVE), so
   a message is at most 402 bytes by default (tests/test_swim.py).
"""

from __future__ import annotations

import random
from collections import deque

from peerlearn.swarm.swim_records import _U32, Changed, Send, SwimConfig, _Member, _Probe
from peerlearn.swarm.swim_view import SwimView
from peerlearn.wire import swim as w
from peerlearn.wire.swim import ALIVE, DEAD, LEFT, STATE_NAMES, SUSPECT

__all__ = ["SwimConfig", "SwimMember", "Send", "Changed"]


class SwimMember(SwimView):
    """One member's failure detector and view. See the module docstring for
    the protocol and what it guarantees."""

    def __init__(self, me: str, addr: str, now: float, rng: random.Random,
                 config: SwimConfig = SwimConfig(), incarnation: int = 0):
        self.me, self.addr, self.rng, self.cfg = me, addr, rng, config
        self.incarnation = incarnation
        self.health = 0  # Lifeguard's local health multiplier
        self.table: dict[str, _Member] = {}
        self.live = 0  # entries ALIVE or SUSPECT
        self._suspects: dict[str, None] = {}
        self._dead: deque[tuple[str, float]] = deque()  # (id, since), oldest first
        self._order: list[str] = []
        self._pos = 0
        self._seq = rng.randrange(_U32)
        self._probe: _Probe | None = None
        self._next_probe = now + rng.uniform(0, config.period)  # members do not beat in step
        self._relays: dict[int, tuple[str, int, str, float, bool]] = {}
        self._periods = 0
        self._reprobe_i = 0
        # (member, suspector or "") -> [update, times sent, order queued]
        self._queue: dict[tuple[str, str], list] = {}
        self._queued = 0
        self._joining: list[tuple[str, str]] = []
        self._parts: dict[str, dict[int, None]] = {}  # seed -> Members parts it got
        self._next_join = float("inf")
        self._syncs = config.max_syncs_per_period
        self._next_housekeeping = now + config.period
        self.left = False

    # ------------------------------------------------------------ queries

    def n(self) -> int:
        """Members this one counts for its timeouts: itself and those alive or suspect."""
        return self.live + 1

    def state_of(self, member: str) -> str | None:
        if member == self.me:
            return "left" if self.left else "alive"
        rec = self.table.get(member)
        return STATE_NAMES[rec.state] if rec else None

    def members(self) -> list[str]:
        """Ids held alive or suspect (a suspect still counts as a member)."""
        return [i for i, r in self.table.items() if r.state in (ALIVE, SUSPECT)]

    def queue_len(self) -> int:
        return len(self._queue)

    def relays_len(self) -> int:
        return len(self._relays)

    def next_deadline(self) -> float:
        """The latest time by which tick() must be called next."""
        t = min(self._next_housekeeping, self._next_join)
        p = self._probe
        if p is None:
            t = min(t, self._next_probe)
        else:
            t = min(t, p.end if p.relays or p.acked else p.start + p.timeout)
        for _, _, _, at, nacked in self._relays.values():
            t = min(t, at if not nacked else at + self.cfg.probe_timeout)
        n = self.n()
        for mid in self._suspects:
            rec = self.table[mid]
            timeout = self.cfg.suspicion_timeout(n, max(0, len(rec.by) - 1))
            t = min(t, rec.since + (timeout / 2 if self._lone(rec) else timeout))
        return t

    # ------------------------------------------------------------ driving

    def know(self, now: float, member: str, addr: str, incarnation: int = 0) -> None:
        """Start with `member` in the table as ALIVE and as knowing us (a
        swarm that starts again from one shared view, as today's applied
        record; the simulator starts that way). Nothing is sent or gossiped."""
        if member != self.me:
            self._merge(now, w.Update(ALIVE, member, incarnation, addr), [], gossip=False)
            if member in self.table:
                self.table[member].told = self.incarnation

    def join(self, now: float, seeds: list[tuple[str, str]]) -> list:
        """Ask these (id, addr) members for the table; repeated every
        join_retry seconds until one answers. At most `indirect` seeds."""
        self._joining = [s for s in seeds if s[0] != self.me][:max(1, self.cfg.indirect)]
        self._next_join = now
        self._enqueue(self._self_update())
        return self.tick(now)

    def leave(self, now: float) -> list:
        """Say LEFT to up to `indirect` members at once (and in what else
        goes out) and stop: every later call returns nothing."""
        if self.left:
            return []
        up = w.Update(LEFT, self.me, self.incarnation)
        targets = self.members()
        self.rng.shuffle(targets)
        out = [Send(t, self.table[t].addr, w.Ping(self._next_seq(), (up,)))
               for t in targets[:self.cfg.indirect]]
        self.left = True
        return out

    def tick(self, now: float) -> list:
        out: list = []
        if self.left:
            return out
        if now >= self._next_housekeeping:
            self._housekeeping(now, out)
        if self._joining and now >= self._next_join:
            self._next_join = now + self.cfg.join_retry
            for sid, saddr in self._joining:
                out.append(Send(sid, saddr, w.Join(self.incarnation, self.addr)))
        self._check_probe(now, out)
        if self._probe is None and now >= self._next_probe:
            self._start_probe(now, out)
        self._check_relays(now, out)
        self._check_suspects(now, out)
        return out

    def receive(self, now: float, src: str, msg) -> list:
        out: list = []
        if self.left or src == self.me:
            return out
        if isinstance(msg, (w.Ping, w.Ack, w.PingReq)):
            for u in msg.updates:
                if u.member == self.me and u.state != ALIVE and src in self.table:
                    self.table[src].told = -1  # it doubts us: our next Ping says who we are
                self._merge(now, u, out)
        if isinstance(msg, w.Ping):
            out.append(Send(src, "", w.Ack(msg.seq, self._piggyback(src))))
        elif isinstance(msg, w.Ack):
            self._on_ack(now, src, msg, out)
        elif isinstance(msg, w.PingReq):
            self._on_ping_req(now, src, msg, out)
        elif isinstance(msg, w.Nack):
            p = self._probe
            if p is not None and msg.seq == p.seq and src in p.relays:
                p.nacks += 1
        elif isinstance(msg, w.Join):
            self._merge(now, w.Update(ALIVE, src, msg.incarnation, msg.addr), out, own=True)
            if self._syncs > 0:
                self._syncs -= 1
                self._answer_join(src, out)
        elif isinstance(msg, w.Members):
            if any(src == sid for sid, _ in self._joining):
                got = self._parts.setdefault(src, {})
                got[msg.part] = None
                if len(got) >= msg.parts:  # the whole table: joined (a lost part: ask again)
                    self._joining, self._next_join, self._parts = [], float("inf"), {}
            for u in msg.entries:
                self._merge(now, u, out, gossip=False)
        return out

    # ------------------------------------------------------------ probing

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _U32
        return self._seq

    def _pick_target(self) -> str | None:
        while True:
            while self._pos < len(self._order):
                mid = self._order[self._pos]
                self._pos += 1
                rec = self.table.get(mid)
                if rec is not None and rec.state in (ALIVE, SUSPECT):
                    return mid
            if not self.live:
                return None
            self._order = self.members()
            self.rng.shuffle(self._order)
            self._pos = 0

    def _start_probe(self, now: float, out: list) -> None:
        scale = 1 + self.health
        self._next_probe = now + self.cfg.period * scale
        target = self._pick_target()
        if target is None:
            return
        p = _Probe(target, self._next_seq(), now, self.cfg.probe_timeout * scale,
                   now + self.cfg.period * scale)
        self._probe = p
        rec = self.table[target]
        # Until it acks a Ping with our ALIVE in it, tell it who we are: a
        # member that gossip missed learns of us within a pass of our round robin.
        me = rec.told != self.incarnation
        if me:
            p.told = self.incarnation
        out.append(Send(target, rec.addr, w.Ping(p.seq, self._piggyback(target, me))))

    def _check_probe(self, now: float, out: list) -> None:
        p = self._probe
        if p is None:
            return
        rec = self.table.get(p.target)
        if rec is None or rec.state not in (ALIVE, SUSPECT):
            self._probe = None  # it left, or someone confirmed it, meanwhile
            return
        if p.acked:
            if now >= p.end:
                self._probe = None
            return
        if not p.relays and now >= p.start + p.timeout:
            others = [i for i in self.members() if i != p.target]
            k = min(self.cfg.indirect, len(others))
            p.relays = self.rng.sample(others, k) if k else []
            for r in p.relays:
                out.append(Send(r, self.table[r].addr,
                                w.PingReq(p.seq, p.target, self._piggyback(r))))
            if not p.relays:
                p.relays = [""]  # nobody to ask: wait for the period's end all the same
        if now >= p.end:
            self._probe = None
            asked = len([r for r in p.relays if r])
            if p.nacks < asked:  # a Nack missing: perhaps we are the slow one
                self.health = min(self.cfg.max_health, self.health + 1)
            self._suspect(now, rec, self.me, out)

    def _on_ack(self, now: float, src: str, msg: w.Ack, out: list) -> None:
        p = self._probe
        if p is not None and msg.seq == p.seq and not p.acked and \
                (src == p.target or src in p.relays):
            p.acked = True
            if src == p.target and p.told >= 0:
                self.table[src].told = p.told
            self.health = max(0, self.health - 1)
            return
        relay = self._relays.get(msg.seq)
        if relay is not None and src == relay[2]:
            del self._relays[msg.seq]
            requester, seq = relay[0], relay[1]
            addr = self.table[requester].addr if requester in self.table else ""
            out.append(Send(requester, addr, w.Ack(seq, self._piggyback(requester))))
        # Anything else (a reprobe's Ack, a late one) brought its updates only.

    def _on_ping_req(self, now: float, src: str, msg: w.PingReq, out: list) -> None:
        rec = self.table.get(msg.target)
        if rec is None or rec.state not in (ALIVE, SUSPECT) or msg.target == src:
            out.append(Send(src, "", w.Nack(msg.seq)))
            return
        if len(self._relays) >= self.cfg.max_relays:
            return  # busy: the requester asked others too
        seq = self._next_seq()
        self._relays[seq] = (src, msg.seq, msg.target, now + self.cfg.probe_timeout / 2, False)
        out.append(Send(msg.target, rec.addr, w.Ping(seq, self._piggyback(msg.target))))

    def _check_relays(self, now: float, out: list) -> None:
        for seq in list(self._relays):
            requester, rseq, target, at, nacked = self._relays[seq]
            if not nacked and now >= at:
                self._relays[seq] = (requester, rseq, target, at, True)
                out.append(Send(requester, "", w.Nack(rseq)))
            elif nacked and now >= at + self.cfg.probe_timeout:
                del self._relays[seq]

    # ------------------------------------------------------------ suspicion

    def _suspect(self, now: float, rec: _Member, by: str, out: list) -> None:
        if rec.state == ALIVE:
            self._set(now, rec, SUSPECT, rec.inc, out)
            rec.by = [by]
        elif rec.state == SUSPECT and by not in rec.by:
            if len(rec.by) > self.cfg.confirmations:
                return
            rec.by.append(by)
        else:
            return
        self._enqueue(w.Update(SUSPECT, rec.id, rec.inc, by=by))

    def _check_suspects(self, now: float, out: list) -> None:
        if not self._suspects:
            return
        n = self.n()
        for mid in list(self._suspects):
            rec = self.table[mid]
            timeout = self.cfg.suspicion_timeout(n, max(0, len(rec.by) - 1))
            if now >= rec.since + timeout:
                self._set(now, rec, DEAD, rec.inc, out, by_me=True)
                self._enqueue(w.Update(DEAD, mid, rec.inc))
            elif self._lone(rec) and now >= rec.since + timeout / 2:
                # Nobody else suspects it: ask it once, our record of it first.
                # A live member refutes on the Ack; gossip of a refutation can
                # run out before a late, stale suspicion reaches everyone.
                rec.checked = True
                out.append(Send(mid, rec.addr, w.Ping(self._next_seq(), self._piggyback(mid))))

    @staticmethod
    def _lone(rec: _Member) -> bool:
        return not rec.checked and len(rec.by) <= 1

    # ------------------------------------------------------------ state
