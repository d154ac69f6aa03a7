"""SWIM membership's table and what spreads about it (part of SwimMember,
swim.py): setting a member's state, merging an update heard (refuting one
about ourselves), making room in a full table, answering a joiner, and the
queue of updates piggybacked on every Ping and Ack, each sent
`SwimConfig.retransmits(n)` times. Same invariants as swim.py's docstring."""

from __future__ import annotations

from collections import deque

from peerlearn.swarm.swim_records import _RANK, Changed, Send, _Member
from peerlearn.wire import swim as w
from peerlearn.wire.swim import ALIVE, DEAD, LEFT, STATE_NAMES, SUSPECT


class SwimView:
    """Mixed into SwimMember (which holds the attributes used here)."""

    def _self_update(self) -> w.Update:
        return w.Update(ALIVE, self.me, self.incarnation, self.addr)

    def _set(self, now: float, rec: _Member, state: int, inc: int, out: list,
             by_me: bool = False) -> None:
        was_live = rec.state in (ALIVE, SUSPECT)
        is_live = state in (ALIVE, SUSPECT)
        self.live += is_live - was_live
        rec.state, rec.inc, rec.since = state, inc, now
        rec.by = []
        rec.checked = False
        if state == SUSPECT:
            self._suspects[rec.id] = None
        else:
            self._suspects.pop(rec.id, None)
        if not is_live:
            self._dead.append((rec.id, now))
            if len(self._dead) > 2 * self.cfg.max_members:  # drop the stale entries
                self._dead = deque((i, t) for i, t in self._dead
                                   if (r := self.table.get(i)) is not None and r.since == t
                                   and r.state in (DEAD, LEFT))
        elif not was_live and len(self._order) - self._pos < 2 * self.cfg.max_members:
            # Back (refuted), or new: probe it in this pass (the cap: a member
            # made to flap cannot grow the pass; it is in the next one anyway).
            self._order.insert(self.rng.randint(self._pos, len(self._order)), rec.id)
        out.append(Changed(rec.id, STATE_NAMES[state], inc, rec.addr, by_me))

    def _merge(self, now: float, u: w.Update, out: list, gossip: bool = True,
               own: bool = False) -> None:
        """Take one update (own: the member's own claim, from its Join)."""
        if u.member == self.me:
            self._about_me(u)
            return
        rec = self.table.get(u.member)
        if rec is None:
            if u.state not in (ALIVE, SUSPECT) or not u.addr or not self._make_room():
                return  # no address to probe it at, or no room
            rec = _Member(u.member, u.addr, u.incarnation, DEAD, now)  # _set makes it live
            self.table[u.member] = rec
            self._set(now, rec, u.state, u.incarnation, out)
            if u.state == SUSPECT:
                rec.by = [u.by] if u.by else []
            if gossip or own:
                self._enqueue(u)
            return
        new, old = (u.incarnation, _RANK[u.state]), (rec.inc, _RANK[rec.state])
        if new > old:
            if u.state == ALIVE:
                rec.addr = u.addr
            self._set(now, rec, u.state, u.incarnation, out)
            if u.state == SUSPECT and u.by:
                rec.by = [u.by]
            if gossip or own:
                self._enqueue(u)
        elif new == old and u.state == SUSPECT and u.by and u.by not in rec.by \
                and len(rec.by) <= self.cfg.confirmations:
            rec.by.append(u.by)  # an independent suspicion: the timeout shrinks
            if gossip:
                self._enqueue(u)

    def _about_me(self, u: w.Update) -> None:
        if u.state == ALIVE and u.incarnation <= self.incarnation:
            return
        if u.state in (SUSPECT, DEAD, LEFT) and u.incarnation < self.incarnation:
            # A stale suspicion still about: say again who we are now.
            self._enqueue(self._self_update())
            return
        if u.state in (SUSPECT, DEAD, LEFT):
            self.health = min(self.cfg.max_health, self.health + 1)
        self.incarnation = min(u.incarnation + 1, w.U64)  # a forged U64 pins it: no wrap
        self._enqueue(self._self_update())

    def _make_room(self) -> bool:
        if len(self.table) < self.cfg.max_members:
            return True
        while self._dead:  # evict the oldest dead entry
            mid, since = self._dead.popleft()
            rec = self.table.get(mid)
            if rec is not None and rec.state in (DEAD, LEFT) and rec.since == since:
                del self.table[mid]
                self._drop_queued(mid)
                return True
        return False

    def _housekeeping(self, now: float, out: list) -> None:
        self._next_housekeeping = now + self.cfg.period
        self._syncs = self.cfg.max_syncs_per_period
        self._periods += 1
        while self._dead and now - self._dead[0][1] >= self.cfg.dead_keep:
            mid, since = self._dead.popleft()
            rec = self.table.get(mid)
            if rec is not None and rec.state in (DEAD, LEFT) and rec.since == since:
                del self.table[mid]
                self._drop_queued(mid)
        if self._periods % self.cfg.reprobe_every == 0:
            dead = [mid for mid, since in self._dead
                    if (r := self.table.get(mid)) is not None and r.since == since
                    and r.state == DEAD]
            if dead:
                mid = dead[self._reprobe_i % len(dead)]
                self._reprobe_i += 1
                out.append(Send(mid, self.table[mid].addr,
                                w.Ping(self._next_seq(), self._piggyback(mid))))

    def _answer_join(self, src: str, out: list) -> None:
        first = [self._self_update()]
        rec = self.table.get(src)
        if rec is not None:  # what we hold about it: a restarted member goes past it
            first.insert(0, w.Update(rec.state, src, rec.inc, rec.addr))
        rest = [w.Update(r.state, r.id, r.inc, r.addr) for r in self.table.values()
                if r.state in (ALIVE, SUSPECT) and r.id != src]
        entries = first + rest
        per = self.cfg.members_per_message
        parts = (len(entries) + per - 1) // per
        for i in range(parts):
            out.append(Send(src, "", w.Members(i, parts, tuple(entries[i * per:(i + 1) * per]))))

    # ------------------------------------------------------------ dissemination

    def _enqueue(self, u: w.Update) -> None:
        if u.state != SUSPECT:
            self._drop_queued(u.member)
        else:  # superseded: an ALIVE, or another member's suspicion of an older incarnation
            for k in [k for k, e in self._queue.items() if k[0] == u.member and
                      (e[0].state != SUSPECT or e[0].incarnation < u.incarnation)]:
                del self._queue[k]
        key = (u.member, u.by if u.state == SUSPECT else "")
        self._queued += 1
        self._queue[key] = [u, 0, self._queued]
        if len(self._queue) > self.cfg.max_queue:  # drop the most sent, oldest first
            worst = max(self._queue, key=lambda k: (self._queue[k][1], -self._queue[k][2]))
            del self._queue[worst]

    def _drop_queued(self, member: str) -> None:
        stale = [k for k in self._queue if k[0] == member]
        for k in stale:
            del self._queue[k]

    def _piggyback(self, dest: str, me: bool = False) -> tuple[w.Update, ...]:
        """Updates for one message to dest: our record of dest first if it
        is not plain ALIVE (the buddy system), our own ALIVE if `me`, then
        the least sent."""
        first: list[w.Update] = []
        rec = self.table.get(dest)
        if rec is not None and rec.state != ALIVE:
            by = rec.by[0] if rec.state == SUSPECT and rec.by else self.me
            first.append(w.Update(rec.state, dest, rec.inc, by=by if rec.state == SUSPECT
                                  else ""))
        if me:
            first.append(self._self_update())
        room = self.cfg.max_piggyback - len(first)
        if not self._queue or room <= 0:
            return tuple(first)
        limit = self.cfg.retransmits(self.n())
        keys = sorted(self._queue, key=lambda k: (self._queue[k][1], -self._queue[k][2]))
        picked = []
        for k in keys:
            if len(picked) >= room:
                break
            entry = self._queue[k]
            if any(entry[0].member == u.member for u in first):
                continue  # what we hold now about it is in already
            picked.append(entry[0])
            entry[1] += 1
            if entry[1] >= limit:
                del self._queue[k]
        return tuple(first + picked)
