"""The peer daemon: the I/O shell around RoundCore.

It moves control messages between the zmq plane and the core, runs the
core's actions, and hands the shared state to its one owner (keeper.py).
All decisions are the core's; this module only executes them.

What a round reduces comes from the caller: `submit` hands the daemon a
`Submission` (a flat fp32 contribution and how to apply the result to the
shared state); the daemon takes part in rounds while one is pending, retries
aborted rounds with it, and settles its future when a round applies it
(contributing.py). peerlearn.swarm.api.Peer is the thread-safe face of this.

Threads and tasks: the asyncio loop owns the core, the control plane and
the daemon's counters; it never reads the state's bytes. Collectives run
on the loop's default executor with buffers they were handed; the state's
bytes are touched on the keeper's one thread; state pushes run on their own
pool (statesync.py). Every coroutine the daemon starts is a task of one
asyncio.TaskGroup in `run`: a failure has one exception tree, and shutdown
waits for every task and thread before it closes a socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine

from peerlearn.state.atomic import write_atomic
from peerlearn.state.identity import Identity, peer_id_of
from peerlearn.state.shared import SharedState
from peerlearn.swarm import rounds as r
from peerlearn.swarm.config import PeerConfig, Submission, split_host_port
from peerlearn.swarm.contributing import Contributing
from peerlearn.swarm.contributions import Contributions
from peerlearn.swarm.datalinks import PeerLinks
from peerlearn.swarm.errors import (
    JoinTimeout,
    PeerClosed,
    PeerStartError,
)
from peerlearn.swarm.keeper import StateKeeper
from peerlearn.swarm.outbox import RecordedOutbox
from peerlearn.swarm.priority import bulk_executor
from peerlearn.swarm.records import (  # noqa: F401 - CHECKPOINT_FILE: the metrics read it here
    CHECKPOINT_FILE,
    load_checkpoint,
    load_record,
    save_record,
)
from peerlearn.swarm.stalls import StallWatch
from peerlearn.swarm.stats import PeerStats, TokenBucket
from peerlearn.swarm.statesync import StateTransfers
from peerlearn.swarm.swim_driver import SwimOnLoop
from peerlearn.swarm.syncing import Syncing
from peerlearn.transport.control import ControlPlane, split_target
from peerlearn.transport.keys import data_secret
from peerlearn.transport.relay import Relay
from peerlearn.wire import control as m
from peerlearn.wire.messages import SWIM_MESSAGES

log = logging.getLogger("peerlearn.peer")

DATA_KEY_FILE = "data.key"
STATUS_REPLY_LINGER_S = 2.0
STATUS_REPLIES_PER_S = 5.0
STATUS_REPLY_BURST = 10
TICK_S = 0.05  # the core's clock tick
# How long a stopping peer waits for a member that stays to answer its Leave
# (one answer lets it leave the view for good, so the quorum shrinks).
LEAVE_ANSWER_S = 1.0


class PeerDaemon(Contributing, Syncing, StallWatch):
    def __init__(self, config: PeerConfig,
                 initial_state: Callable[[], SharedState] | None = None):
        """initial_state builds the state a founder starts from (when it has no
        checkpoint); None starts from an empty state at step 0."""
        self.cfg = config
        if config.join is not None and config.secret is None:
            join_id = split_target(config.join)[0]
            if join_id is None:
                raise ValueError("an allowlist swarm is joined as PEER_ID@HOST:PORT: the id "
                                 "names the only peer the handshake accepts there")
            if join_id not in {peer_id_of(k) for k in config.allowlist or []}:
                raise ValueError(f"{join_id} is not on the allowlist: it cannot be joined")
        self.identity = Identity.load_or_create(config.data_dir)
        self.id = self.identity.peer_id
        self.plane = ControlPlane(self.identity, config.host, config.control_port,
                                  secret=config.secret, allowlist=config.allowlist,
                                  dial_back=config.dial_back)
        self.data_key = self._data_key(config.join is None)
        # A joiner of an allowlist swarm gets the key when it is admitted (DataKey);
        # until then its listener holds a random key that nobody can prove.
        self.links = PeerLinks(self.id, config.host, config.data_port,
                               self.data_key or os.urandom(32), config.n_conns,
                               identity=self.identity, dial_back=config.dial_back,
                               relay=[split_host_port(a.strip())
                                      for a in (config.relay_via or "").split(",") if a.strip()],
                               hole_punch=config.hole_punch)
        self.relay = None if config.relay_port is None else \
            Relay(config.host, config.relay_port, self.links.secret)
        self.info = m.PeerInfo(self.id, *config.advertised(self.plane.port, self.links.port))
        state = load_checkpoint(config.data_dir)
        founder = config.join is None
        resuming = founder and state is not None
        if state is None and founder:
            state = initial_state() if initial_state is not None else SharedState(0)
        # The shared state's one owner (keeper.py): its bytes are read and
        # written on the keeper's thread only.
        self.keeper = StateKeeper(state)
        self.core = r.RoundCore(self.info, config.timeouts, founder=founder, resuming=resuming,
                                record=load_record(config.data_dir))
        self._recorded_ids = (self.core.max_round_id, self.core.term)
        # What we send waits for the record it depends on; the loop never
        # writes it (outbox.py).
        self.outbox = RecordedOutbox(self.core.record,
                                     lambda rec: save_record(config.data_dir, rec),
                                     self._execute)
        # Under pressure the socket and link tables keep the view's members
        # (transport.control.ControlPlane.keep, datalinks.PeerLinks.standing).
        self.plane.forward_via = self._forward_via
        self.plane.keep = lambda: [p.control for i, p in self.core.known.items()
                                   if i in self.core.members]
        self.links.standing = lambda pid: 2 if pid in self.core.members else \
            int(pid in self.core.known)
        if state is not None:  # before the loop runs: hashed here, once
            self.keeper.digest = state.state_hash()
            self.core.state_synced(state.step, self.keeper.digest)
        # The caller's contributions, in submission order (contributions.py).
        self.contribs: Contributions[Submission] = Contributions()
        self.transfers = StateTransfers(self)
        self.inflight_links: dict[int, list] = {}  # round -> links its worker uses
        # The daemon's own tasks, each at most one at a time; all run in the
        # task group of `run` (nothing outlives the daemon).
        self.round_task: asyncio.Task | None = None  # the round being run (contributing.py)
        self.sync_task: asyncio.Task | None = None  # the one fetch running
        self.ready_task: asyncio.Task | None = None
        self.checkpoint_task: asyncio.Task | None = None
        self.decisions: dict[int, asyncio.Future] = {}  # round -> its ApplyResult or None
        self._group: asyncio.TaskGroup | None = None
        self.last_applied_at = time.monotonic()  # or synced: the swarm moved us forward
        self.round_gaps: deque[float] = deque(maxlen=8)  # seconds between recent applies
        self._stall_logged: tuple[str | None, float] = (None, 0.0)
        self._stall_seen: str | None = None  # core.stall at the last tick (debug log)
        self.loop_errors = 0
        self.nonfinite_rounds = 0
        self.refused_contributions = 0  # rows a robust rule left out as not finite
        self.bad_states = 0  # fetched states refused (hash mismatch or not finite)
        self.status_replies = TokenBucket(STATUS_REPLIES_PER_S, STATUS_REPLY_BURST)
        self.status_refused = 0
        self.ready_handle: asyncio.TimerHandle | None = None
        # Counters for metrics (read by peerlearn.cli.metrics at scrape time).
        self.rounds_applied = 0
        self.rounds_aborted = 0
        self.stats = PeerStats()  # durations, retries, gossip, checkpoints
        self.syncs = 0
        self.sync_failures = 0
        self.sync_failed_in_a_row = 0
        self.parity_mismatches = 0
        self.handler_errors = 0
        self._view_logged: frozenset[str] = frozenset()
        # SWIM beside the heartbeats, observed only (swim_driver.py).
        self.swim = SwimOnLoop(self.id, self.info.control, time.monotonic(),
                               send=lambda to, addr, msg: self.plane.send(addr, msg, to=to),
                               address_of=self._swim_address) if config.swim else None
        self.swim_dropped = 0  # SWIM messages to a peer that runs none
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    # ------------------------------------------------------------ lifecycle

    @property
    def state(self) -> SharedState | None:
        """The live shared state (its bytes belong to the keeper's thread)."""
        return self.keeper.state

    @property
    def syncing(self) -> bool:
        return self.sync_task is not None

    def closed_error(self) -> PeerClosed:
        return PeerClosed("the peer is shutting down")

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """A task of the daemon's group: awaited at shutdown, its failure the daemon's."""
        return self._group.create_task(coro)

    def _data_key(self, founder: bool) -> bytes | None:
        """The data-plane key: from the secret, else the one this peer holds
        (saved when it founded or joined), else a new one if it founds."""
        if self.cfg.secret:
            return data_secret(self.cfg.secret)
        path = self.cfg.data_dir / DATA_KEY_FILE
        if path.exists() and len(path.read_bytes()) == 32:
            return path.read_bytes()
        if not founder:
            return None
        key = os.urandom(32)
        write_atomic(path, [key], mode=0o600)
        return key

    def _on_data_key(self, key: bytes) -> None:
        if self.data_key is not None or self.cfg.secret:
            return  # we have one; a member cannot make us switch
        self.data_key = key
        self.links.set_secret(key)
        if self.relay is not None:
            self.relay.set_data_key(key)
        write_atomic(self.cfg.data_dir / DATA_KEY_FILE, [key], mode=0o600)

    def _record_changed(self) -> None:
        """After every applied round or sync, a proposal made or acked, a view
        change: a restart must not forget it (its checkpoint may be older).
        What is dispatched from now on leaves once the record is on disk."""
        self._recorded_ids = (self.core.max_round_id, self.core.term)
        self.outbox.changed()

    async def run(self, stop: asyncio.Event) -> None:
        """Runs the peer until `stop` is set. Raises what ended it (JoinTimeout,
        PeerStartError, or a bug in one of its tasks); several at once come as
        the task group's ExceptionGroup."""
        try:
            await self._run(stop)
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _run(self, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        # Collectives and state pulls: bulk work, below the loop (priority.py).
        self.loop.set_default_executor(bulk_executor(None, "peerlearn-bulk"))
        self.keeper.loop = self.loop
        async with asyncio.TaskGroup() as group:
            self._group = group
            background = [group.create_task(self._recv_loop()),
                          group.create_task(self.plane.watch_handshakes()),
                          group.create_task(self.outbox.run())]
            try:
                if self.cfg.join:
                    await self._join(stop)
                await self._tick_until(stop)
            finally:
                await self._shutdown(background)

    async def _tick_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                now = time.monotonic()
                self._dispatch(self.core.tick(now))
                self._watch_stall(now)
                if self.swim is not None:
                    if not self.swim.joined:
                        self.swim.seed(now, [(i, p.control) for i, p in self.core.members.items()])
                    self.swim.tick(now)
            except Exception:  # noqa: BLE001 - a bug here must not end the peer silently
                self.loop_errors += 1
                if self.loop_errors <= 10 or self.loop_errors % 1000 == 0:
                    log.exception("%s tick failed (%d so far)", self.id[:8], self.loop_errors)
            slept = time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), TICK_S)
            except TimeoutError:
                # The loop-lag probe: how much later than asked we woke.
                self.stats.tick_late(max(0.0, time.monotonic() - slept - TICK_S))

    async def _shutdown(self, background: list[asyncio.Task]) -> None:
        """Goodbye, then every task and thread ends before a socket closes;
        the last checkpoint is written after the last apply."""
        await self._say_goodbye()
        self.closing = True  # from here on, no new round, Ready or checkpoint starts
        self._fail_submissions(self.closed_error())
        if self.ready_handle is not None:
            self.ready_handle.cancel()
        await asyncio.sleep(0.05)  # let the Leave go out
        for t in background:
            t.cancel()
        for links in list(self.inflight_links.values()):
            for link in links:
                link.abort()  # a collective on a worker ends now, not at its timeout
        for t in (self.round_task, self.sync_task, self.ready_task, self.checkpoint_task):
            if t is not None:
                t.cancel()
        for fut in self.decisions.values():
            fut.cancel()
        await asyncio.gather(*[t for t in (*background, self.round_task, self.sync_task,
                                           self.ready_task, self.checkpoint_task)
                               if t is not None], return_exceptions=True)
        await self.outbox.close()  # the last apply's record
        if self.state is not None:
            try:  # queued behind any apply still on the state thread
                await asyncio.shield(self.keeper.checkpoint(self.cfg.data_dir / CHECKPOINT_FILE))
            except Exception as e:  # noqa: BLE001 - a directory in the way, a full disk
                log.error("%s could not write its checkpoint on the way out: %s", self.id[:8], e)
        self.plane.close()
        await self.loop.run_in_executor(None, self.links.close)
        if self.relay is not None:
            await self.loop.run_in_executor(None, self.relay.close)
        await self.loop.run_in_executor(None, self.transfers.close)
        await self.loop.run_in_executor(None, self.keeper.close)

    async def _say_goodbye(self) -> None:
        """Leave, and leave the view for good if a member stays (it answers
        within LEAVE_ANSWER_S): the record says so on disk before anyone
        hears it, so this peer never votes in that view again and the others
        may shrink their quorum. Bounded: a swarm stopping all at once waits
        LEAVE_ANSWER_S at most, and then every peer keeps its place."""
        now = time.monotonic()
        if self.swim is not None:
            self.swim.leave(now)
        self._dispatch(self.core.leave(now))
        deadline = now + LEAVE_ANSWER_S
        while self.core.staying_members(time.monotonic()) and not self.core.stayers and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.core.stayers:
            sends = self.core.depart(time.monotonic())
            self._record_changed()
            self._dispatch(sends)
            await self.outbox.drained()
            log.info("%s left the swarm: %d members go on without it", self.id[:8],
                     len(self.core.members))

    async def _join(self, stop: asyncio.Event) -> None:
        """Asks the join address until a member lets us in; raises JoinTimeout
        after cfg.join_timeout (None: keep asking until stopped)."""
        join_id, join_addr = split_target(self.cfg.join)
        if join_id is not None:  # an address may be spelled otherwise than advertised
            self.core.joining_at(join_id)
        started = time.monotonic()
        while not self.core.members:
            if self.cfg.join_timeout is not None and \
                    time.monotonic() - started >= self.cfg.join_timeout:
                raise JoinTimeout(f"no swarm member answered at {self.cfg.join} within "
                                  f"{self.cfg.join_timeout:g} s")
            self.plane.send(join_addr, m.Join(self.info), to=join_id)
            refused = self.plane.refused(join_addr, to=join_id)
            if refused:  # it answered, but the handshake fails: no point waiting the timeout
                raise PeerStartError(f"{self.cfg.join} {refused}")
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
                return  # told to stop before anyone let us in
            except TimeoutError:
                pass
        log.info("%s joined a swarm of %d", self.id[:8], len(self.core.members))

    async def _recv_loop(self) -> None:
        while True:
            sender, msg = await self.plane.recv()
            try:
                self._handle(sender, msg)
            except Exception:  # noqa: BLE001 - one bad message must not end the peer
                self.handler_errors += 1
                log.exception("%s dropped a %s from %s", self.id[:8], type(msg).__name__,
                              sender[:8])

    def _handle(self, sender: str, msg) -> None:
        """Daemon-level messages here; membership and rounds go to the core."""
        if isinstance(msg, SWIM_MESSAGES):
            if self.swim is None:
                self.swim_dropped += 1
            else:
                self.swim.receive(time.monotonic(), sender, msg)
            return
        if isinstance(msg, m.StateRequest):
            self.transfers.serve(sender, msg)
        elif isinstance(msg, (m.StateOffer, m.StateRefused)):
            self.transfers.on_offer(sender, msg)
        elif isinstance(msg, m.DataKey):
            self._on_data_key(msg.key)
        elif isinstance(msg, m.StatusRequest):
            # Each reply may open a socket to an address the asker picks: a
            # flood is answered at a bounded rate, the rest dropped and counted.
            if not self.status_replies.take(time.monotonic()):
                self.status_refused += 1
                return
            self.plane.send(msg.reply_to, m.StatusReply(self.status_rows()), to=sender)
            # A querier's address is used once: drop its socket after the reply
            # had time to leave, or a dashboard polling status leaks one per poll.
            self.loop.call_later(STATUS_REPLY_LINGER_S, self.plane.disconnect, msg.reply_to)
        elif not isinstance(msg, m.StatusReply):  # unsolicited replies are ignored
            self._dispatch(self.core.receive(time.monotonic(), sender, msg))

    def _swim_address(self, peer: str) -> str | None:
        rec = self.swim.member.table.get(peer) if self.swim is not None else None
        info = self.core.known.get(peer)
        return rec.addr if rec is not None else info.control if info is not None else None

    def _forward_via(self, to: str) -> str | None:
        """The control address of a live member that can pass a message on to
        `to`, a peer we cannot dial and that never dialled us (both behind
        NAT): the coordinator if it can be dialled, else the smallest such id."""
        now = time.monotonic()
        lead = self.core.coordinator(now)
        for p in ([lead] if lead else []) + sorted(self.core.members):
            info = self.core.known.get(p)
            if p not in (self.id, to) and info is not None and info.control != m.DIAL_BACK \
                    and self.core.alive(p, now):
                return info.control
        return None

    # ------------------------------------------------------------ actions

    def _dispatch(self, actions) -> None:
        if self.closing:
            return
        actions = list(actions)
        if (self.core.max_round_id, self.core.term) > self._recorded_ids or any(
                isinstance(a, r.ViewChanged) and frozenset(a.members) != self._view_logged
                for a in actions):
            # A proposal made or acked is on disk before any message about it
            # leaves: a restart that forgot an ack could ack a second proposal
            # for the same step (two hashes for one step; the property run).
            self._record_changed()
        self.outbox.dispatch(actions)

    def _execute(self, actions: list) -> None:
        """Runs a batch the outbox let go (on the loop, in dispatch order)."""
        if self.closing:
            return
        for a in actions:
            if isinstance(a, r.Send):
                peer = self.core.known.get(a.to)
                if peer is not None:
                    self.plane.send(peer.control, a.msg, to=peer.id)
                    if isinstance(a.msg, m.Welcome) and not self.cfg.secret and self.data_key:
                        # The core let it in, and the control plane admitted it
                        # by the allowlist: it gets the data key with the view.
                        self.plane.send(peer.control, m.DataKey(self.data_key), to=peer.id)
            elif isinstance(a, r.StartCollective):
                self._start_round(a)
            elif isinstance(a, r.ApplyResult):
                if not self._decided(a.round_id, a):
                    # Decided "apply" but we hold no result: stay where we are;
                    # the parity check sees the swarm ahead and fetches its state.
                    log.warning("%s has no result for applied round %d", self.id[:8],
                                a.round_id)
                    self.core.state_synced(self.keeper.step, self.keeper.digest)
            elif isinstance(a, r.DiscardResult):
                self.rounds_aborted += 1
                if not self._decided(a.round_id, None):
                    # Our round task ended before the decision (our collective
                    # failed, or its result was refused): the Ready it could
                    # not send while the round was open goes now.
                    self._retry("aborted")
                # The round is over for everyone: free our worker now rather
                # than at its step timeout (a hung peer would hold it there).
                for link in self.inflight_links.pop(a.round_id, []):
                    link.abort()
                log.info("%s round %d aborted", self.id[:8], a.round_id)
            elif isinstance(a, r.SyncNeeded):
                if self.state is not None:
                    self.parity_mismatches += 1  # we hold a state, and it is not the swarm's
                if self.sync_task is None:  # else the running sync ends with synced or failed
                    self.sync_task = self.spawn(self._sync(a))
            elif isinstance(a, r.ViewChanged) and frozenset(a.members) != self._view_logged:
                # Every applied round starts a view: say so only when its members
                # change. A member that departed shrinks it between rounds: the
                # record must not count it after a restart.
                self._view_logged = frozenset(a.members)  # recorded: see _dispatch
                log.info("%s view %d: %d members", self.id[:8], a.epoch, len(a.members))

    # ------------------------------------------------------------ status

    def status_rows(self) -> tuple:
        now = time.monotonic()
        coord = self.core.coordinator(now)
        rows = []
        for pid, info in sorted(self.core.known.items()):
            if pid == self.id:  # the core's copy: the state may be mid-apply on a worker
                step, h = self.core.step, self.core.state_hash
            else:
                b = self.core.beats.get(pid)
                step, h = (b.step, b.state_hash) if b else (0, r.ZERO_HASH)
            alive = self.core.alive(pid, now)
            member = pid in self.core.members
            role = "coordinator" if pid == coord else "member" if member else "joiner"
            if not alive:
                role = "lost" if member else "dead"
            rows.append((pid, info.control, info.data, role, step, h, alive))
        return tuple(rows)
