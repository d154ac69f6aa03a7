"""The peer daemon: the I/O shell around RoundCore.

It moves control messages between the zmq plane and the core, runs the
core's actions (collectives and state transfers on worker threads, whose
results come back to the loop), keeps the shared state and checkpoints it.
All decisions are the core's; this module only executes them.

What a round reduces comes from the caller: `submit` hands the daemon a
`Submission` (a flat fp32 contribution and how to apply the mean to the
shared state); the daemon takes part in rounds while one is pending, retries
aborted rounds with it, and settles its future when a round applies it.
peerlearn.swarm.api.Peer is the thread-safe face of this.

Threads: the asyncio loop owns the core, the state and the control plane.
Collectives and state transfers run on the loop's default executor and touch
only what they were handed (a snapshot or a fresh buffer); their results are
applied on the loop. Shutdown cancels the loop's tasks, waits for the
executor and closes every socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from peerlearn.state import checkpoint
from peerlearn.state.atomic import write_atomic
from peerlearn.state.identity import Identity, peer_id_of
from peerlearn.state.shared import SharedState
from peerlearn.swarm import rounds as r
from peerlearn.swarm.allreduce import AllReduceAborted
from peerlearn.swarm.collective import poisoned_mean, run_collective
from peerlearn.swarm.config import PeerConfig, Submission
from peerlearn.swarm.datalinks import PeerLinks
from peerlearn.swarm.errors import (
    JoinTimeout,
    PeerClosed,
    PeerStartError,
    StateReplaced,
    Withdrawn,
)
from peerlearn.swarm.stats import PeerStats, TokenBucket
from peerlearn.swarm.statesync import MAX_DONORS, BadState, StateTransfers, SyncFailed
from peerlearn.transport.control import ControlPlane, split_target
from peerlearn.transport.keys import data_secret
from peerlearn.transport.stream import StreamError
from peerlearn.wire import control as m
from peerlearn.wire.codecs import hash_tensor

log = logging.getLogger("peerlearn.peer")

CHECKPOINT_FILE = "state.ckpt"
RECORD_FILE = "applied.json"
DATA_KEY_FILE = "data.key"
STATUS_REPLY_LINGER_S = 2.0
STATUS_REPLIES_PER_S = 5.0
STATUS_REPLY_BURST = 10
STALL_LOG_EVERY_S = 30.0
TICK_S = 0.05  # the core's clock tick
# A stall is logged once no round applied for STALL_ROUNDS times the longest
# of the last few round gaps, and never before STALL_FIRST_S: DiLoCo's rounds
# come every H inner steps (tens of seconds on a busy machine, after a burst
# of quick start-up rounds), and such a gap is the swarm computing, not
# stalling. A lost majority is said after 2 x dead_after regardless.
STALL_ROUNDS = 3.0
STALL_FIRST_S = 60.0
# How long a stopping peer waits for a member that stays to answer its Leave
# (one answer lets it leave the view for good, so the quorum shrinks).
LEAVE_ANSWER_S = 1.0


class PeerDaemon:
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
                                  secret=config.secret, allowlist=config.allowlist)
        self.data_key = self._data_key(config.join is None)
        # A joiner of an allowlist swarm gets the key when it is admitted (DataKey);
        # until then its listener holds a random key that nobody can prove.
        self.links = PeerLinks(self.id, config.host, config.data_port,
                               self.data_key or os.urandom(32), config.n_conns,
                               identity=self.identity)
        self.info = m.PeerInfo(self.id, *config.advertised(self.plane.port, self.links.port))
        self.state = self._load_checkpoint()
        founder = config.join is None
        resuming = founder and self.state is not None
        if self.state is None and founder:
            self.state = initial_state() if initial_state is not None else SharedState(0)
        self.core = r.RoundCore(self.info, config.timeouts, founder=founder, resuming=resuming,
                                record=self._load_record())
        self._recorded_ids = (self.core.max_round_id, self.core.term)
        # Under pressure the socket and link tables keep the view's members
        # (transport.control.ControlPlane.keep, datalinks.PeerLinks.standing).
        self.plane.keep = lambda: [p.control for i, p in self.core.known.items()
                                   if i in self.core.members]
        self.links.standing = lambda pid: 2 if pid in self.core.members else \
            int(pid in self.core.known)
        if self.state is not None:
            self.core.state_synced(self.state.step, self.state.state_hash())
        self.pending: dict[int, torch.Tensor] = {}
        self.round_subs: dict[int, Submission] = {}  # round -> the contribution it carries
        # Contributions in submission order; the first is the one rounds run with.
        self.submissions: deque[Submission] = deque()
        self.transfers = StateTransfers(self)
        self.inflight_links: dict[int, list] = {}  # round -> links its worker uses
        self.syncing = False
        self.sync_task: asyncio.Task | None = None  # the one fetch running; shutdown awaits it
        self.last_applied_at = time.monotonic()  # or synced: the swarm moved us forward
        self.round_gaps: deque[float] = deque(maxlen=8)  # seconds between recent applies
        self._stall_logged: tuple[str | None, float] = (None, 0.0)
        self.loop_errors = 0
        self.nonfinite_rounds = 0
        self.refused_contributions = 0  # rows a robust rule left out as not finite
        self.bad_states = 0  # fetched states refused (hash mismatch or not finite)
        self.status_replies = TokenBucket(STATUS_REPLIES_PER_S, STATUS_REPLY_BURST)
        self.status_refused = 0
        self.busy = False  # a collective is running for us
        self.applying = False  # an apply runs on a worker: the state is not ours to read
        self.ready_handle: asyncio.TimerHandle | None = None
        # Counters for metrics (read by peerlearn.cli.metrics at scrape time).
        self.rounds_applied = 0
        self.rounds_aborted = 0
        self.stats = PeerStats()  # durations, retries, gossip, checkpoints
        self.syncs = 0
        self.sync_failures = 0
        self.parity_mismatches = 0
        self.handler_errors = 0
        self._view_logged: frozenset[str] = frozenset()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.checkpointing = False

    # ------------------------------------------------------------ lifecycle

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
        write_atomic(self.cfg.data_dir / DATA_KEY_FILE, [key], mode=0o600)

    def _load_record(self) -> r.Applied | None:
        """The applied record (see actions.Applied) this data dir holds, if any."""
        path = self.cfg.data_dir / RECORD_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_bytes())
            members = tuple(m.PeerInfo.from_wire(p) for p in raw["members"])
            departed = raw.get("departed", False)
            if not isinstance(departed, bool):
                raise ValueError("departed must be true or false")
            return r.Applied(int(raw["epoch"]), members, int(raw["max_round_id"]),
                             int(raw["term"]), int(raw["step"]), bytes.fromhex(raw["state_hash"]),
                             departed)
        except (OSError, ValueError, KeyError, TypeError, m.MessageError) as e:
            log.warning("ignoring %s: %s", RECORD_FILE, e)
            return None

    def _save_record(self) -> None:
        """After every applied round or sync: a restart must not forget that this
        peer reached this step (its checkpoint may be older). Small, atomic."""
        rec = self.core.record()
        self._recorded_ids = (rec.max_round_id, rec.term)
        body = {"epoch": rec.epoch, "members": [p.to_wire() for p in rec.members],
                "max_round_id": rec.max_round_id, "term": rec.term, "step": rec.step,
                "state_hash": rec.state_hash.hex(), "departed": rec.departed}
        try:
            write_atomic(self.cfg.data_dir / RECORD_FILE, [json.dumps(body).encode()],
                         mode=0o600)
        except OSError as e:
            log.warning("%s could not write %s: %s", self.id[:8], RECORD_FILE, e)

    def _load_checkpoint(self) -> SharedState | None:
        path = self.cfg.data_dir / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            return checkpoint.load(path)
        except checkpoint.CheckpointError as e:
            log.warning("ignoring checkpoint: %s", e)
            return None

    async def run(self, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(self._recv_loop()),
                 asyncio.ensure_future(self.plane.watch_handshakes())]
        try:
            if self.cfg.join:
                await self._join(stop)
            while not stop.is_set():
                try:
                    now = time.monotonic()
                    self._dispatch(self.core.tick(now))
                    self._watch_stall(now)
                except Exception:  # noqa: BLE001 - a bug here must not end the peer silently
                    self.loop_errors += 1
                    if self.loop_errors <= 10 or self.loop_errors % 1000 == 0:
                        log.exception("%s tick failed (%d so far)", self.id[:8],
                                      self.loop_errors)
                slept = time.monotonic()
                try:
                    await asyncio.wait_for(stop.wait(), TICK_S)
                except TimeoutError:
                    # The loop-lag probe: how much later than asked we woke.
                    self.stats.tick_late(max(0.0, time.monotonic() - slept - TICK_S))
        finally:
            await self._say_goodbye()
            self.closing = True  # from here on, timers and worker callbacks do nothing
            self._fail_submissions(PeerClosed("the peer is shutting down"))
            if self.ready_handle is not None:
                self.ready_handle.cancel()
            await asyncio.sleep(0.05)  # let the Leave go out
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # An older snapshot must not land after the final one, nor may the
            # final one be taken while an apply writes the state.
            while self.checkpointing or self.applying:
                await asyncio.sleep(0.05)
            if self.state is not None:
                self._checkpoint_now()
            if self.sync_task is not None:
                self.sync_task.cancel()
                await asyncio.gather(self.sync_task, return_exceptions=True)
            self.plane.close()
            await self.loop.run_in_executor(None, self.links.close)
            await self.loop.run_in_executor(None, self.transfers.close)

    async def _say_goodbye(self) -> None:
        """Leave, and leave the view for good if a member stays (it answers
        within LEAVE_ANSWER_S): the record says so on disk before anyone
        hears it, so this peer never votes in that view again and the others
        may shrink their quorum. Bounded: a swarm stopping all at once waits
        LEAVE_ANSWER_S at most, and then every peer keeps its place."""
        now = time.monotonic()
        self._dispatch(self.core.leave(now))
        deadline = now + LEAVE_ANSWER_S
        while self.core.staying_members(time.monotonic()) and not self.core.stayers and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.core.stayers:
            sends = self.core.depart(time.monotonic())
            self._save_record()
            self._dispatch(sends)
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

    def _watch_stall(self, now: float) -> None:
        """A swarm that stops applying rounds says why, once per reason and
        every STALL_LOG_EVERY_S while it lasts (the coordinator knows why).
        A lost majority is an ERROR that says what the operator can do."""
        idle = now - self.last_applied_at
        lost = self.core.unreachable_voters(now) if idle > 2 * self.cfg.timeouts.dead_after \
            else []
        # Nobody wants a round (no contribution here, no Ready heard): the
        # swarm is idle (a lone `--algo local` peer, peers computing), not stalled.
        wanted = bool(self.submissions) or bool(self.core.readies)
        reason = self.core.stall if wanted and idle > self.stall_after() else None
        level = logging.WARNING
        if lost:
            reason, level = self.majority_lost(lost), logging.ERROR
            if all(p in self.core.left for p in lost):
                # They said goodbye (the swarm stopping all at once: nobody
                # stayed to let them leave the view): an ending, not a failure.
                reason, level = (f"the swarm stopped: {len(lost)} of the view's voting members "
                                 "said goodbye; rounds resume when enough of them are back"),\
                    logging.INFO
        if reason is None:
            self._stall_logged = (None, 0.0)
            return
        if reason != self._stall_logged[0] or now - self._stall_logged[1] >= STALL_LOG_EVERY_S:
            self._stall_logged = (reason, now)
            log.log(level, "%s no round applied for %.0f s: %s", self.id[:8],
                    now - self.last_applied_at, reason)

    def stall_after(self) -> float:
        """Seconds without an applied round that count as a stall here."""
        return max(STALL_FIRST_S, STALL_ROUNDS * max(self.round_gaps, default=0.0))

    def majority_lost(self, lost: list[str]) -> str:
        """Why no round can apply while `lost` voters are unreachable, and what to do."""
        voters = len(self.core.voters())
        names = ", ".join(f"{p[:8]} ({self.core.known[p].control})" if p in self.core.known
                          else p[:8] for p in lost)
        return (f"majority lost: {len(lost)} of the view's {voters} voting members are "
                f"unreachable ({names}) and a round needs {voters // 2 + 1}. Start them again "
                f"(they resume from their data dirs). If they are gone for good, stop this peer, "
                f"delete {self.cfg.data_dir / RECORD_FILE} and start it again: it founds a new "
                f"swarm from its checkpoint (step {self.core.step}). Peers that stop with "
                f"Ctrl-C leave the view and never cause this.")

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

    # ------------------------------------------------------------ actions

    def _dispatch(self, actions) -> None:
        if self.closing:
            return
        if (self.core.max_round_id, self.core.term) > self._recorded_ids:
            # A proposal made or acked is on disk before any message about it
            # leaves: a restart that forgot an ack could ack a second proposal
            # for the same step (two hashes for one step; the property run).
            self._save_record()
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
                self.busy = True
                started = time.monotonic()
                sub = self.submission
                if sub is not None:  # the round's apply and result belong to it, whatever
                    self.round_subs[a.round_id] = sub  # leads by the time it applies
                fut = self.loop.run_in_executor(
                    None, run_collective, self.links, self.cfg, self.id, a,
                    None if sub is None else sub.tensor, self.inflight_links)
                fut.add_done_callback(lambda f, t=started: self.stats.durations.observe(
                    "all_reduce", time.monotonic() - t))
                fut.add_done_callback(lambda f, a=a: self._collective_done(a, f))
            elif isinstance(a, r.ApplyResult):
                self._apply(a)
            elif isinstance(a, r.DiscardResult):
                self.rounds_aborted += 1
                self.pending.pop(a.round_id, None)
                self.round_subs.pop(a.round_id, None)
                # The round is over for everyone: free our worker now rather
                # than at its step timeout (a hung peer would hold it there).
                for link in self.inflight_links.pop(a.round_id, []):
                    link.abort()
                log.info("%s round %d aborted", self.id[:8], a.round_id)
                self._retry("aborted")
            elif isinstance(a, r.SyncNeeded):
                if self.applying:  # the state is being written: ask again next tick
                    self.core.sync_failed()
                    continue
                if self.state is not None:
                    self.parity_mismatches += 1  # we hold a state, and it is not the swarm's
                if not self.syncing:  # else the running sync ends with synced or failed
                    self.syncing = True
                    self.sync_task = self.loop.create_task(self._sync(a))
            elif isinstance(a, r.ViewChanged) and frozenset(a.members) != self._view_logged:
                # Every applied round starts a view: say so only when its members
                # change. A member that departed shrinks it between rounds: the
                # record must not count it after a restart.
                self._view_logged = frozenset(a.members)
                self._save_record()
                log.info("%s view %d: %d members", self.id[:8], a.epoch, len(a.members))

    def submit(self, sub: Submission) -> None:
        """On the loop: take part in rounds with sub until one applies it.

        Contributions submitted while one is pending wait behind it and go
        into later rounds, one round each, in submission order.
        """
        if self.closing:
            _settle(sub.future, exc=PeerClosed("the peer is shutting down"))
            return
        self.submissions.append(sub)
        if len(self.submissions) == 1:
            self._schedule_ready(0.0)

    def withdraw(self, sub: Submission) -> None:
        """On the loop: the caller gave up on sub. A round already running with
        it still completes (and applies it) for everyone's sake."""
        if sub not in self.submissions:
            return
        if sub is not self.submission:  # queued: no round has seen it
            self.submissions.remove(sub)
            _settle(sub.future, exc=Withdrawn("withdrawn before its round"))
            return
        sub.withdrawn = True
        self.core.not_ready()  # no new round may count on it
        self._drop_withdrawn_head()

    @property
    def submission(self) -> Submission | None:
        """The contribution rounds run with now (the first submitted)."""
        return self.submissions[0] if self.submissions else None

    def _next_submission(self) -> None:
        """The head is done (applied, failed or withdrawn): the next one leads."""
        self.submissions.popleft()
        if self.submissions:
            self._schedule_ready(0.0)

    def _drop_withdrawn_head(self) -> None:
        """A withdrawn head that no round is using fails with Withdrawn; the next leads."""
        sub = self.submission
        if sub is not None and sub.withdrawn and not self.busy and self.core.active is None:
            _settle(sub.future, exc=Withdrawn("withdrawn before its round"))
            self._next_submission()

    def _fail_submissions(self, exc: BaseException) -> None:
        """Every contribution, the leading one and those queued, fails with exc."""
        while self.submissions:
            _settle(self.submissions.popleft().future, exc=exc)

    def _retry(self, reason: str) -> None:
        """A round ended without applying (reason: stats.RETRY_REASONS): go again
        with the same contribution, unless the caller withdrew it (dropped here)."""
        self.stats.retried(reason)
        self._drop_withdrawn_head()
        self._schedule_ready(0.0)

    def _schedule_ready(self, delay: float) -> None:
        if self.closing:
            return
        if self.ready_handle is not None:
            self.ready_handle.cancel()
        self.ready_handle = self.loop.call_later(delay, self._ready)

    def _ready(self) -> None:
        self.ready_handle = None
        if self.state is None or self.syncing or self.busy or self.applying or \
                self.core.active is not None \
                or self.submission is None or self.submission.withdrawn:
            return
        self._dispatch(self.core.local_ready(time.monotonic(), self.state.step,
                                             self.state.state_hash()))

    def _collective_done(self, a: r.StartCollective, fut) -> None:
        self.busy = False
        self.inflight_links.pop(a.round_id, None)
        try:
            outcome = fut.result()
        except (AllReduceAborted, StreamError, TimeoutError, OSError) as e:
            self.round_subs.pop(a.round_id, None)
            log.info("%s collective %d failed: %s", self.id[:8], a.round_id, e)
            self._dispatch(self.core.collective_finished(time.monotonic(), a.round_id, False))
            self._retry("collective_failed")
            return
        if self.core.active is None or self.core.active.round_id != a.round_id:
            self.round_subs.pop(a.round_id, None)
            self._retry("superseded")  # decided (aborted) while we were still at it
            return
        result = outcome.value
        for culprit in outcome.refused:
            # The robust rule left its NaN row out; the coordinator (if it is
            # us) shuts the sender out as it does a traced poisoner.
            self.refused_contributions += 1
            log.warning("%s round %d: %s contributed non-finite values; left out",
                        self.id[:8], a.round_id, culprit[:8])
            self.core.contribution_refused(culprit, time.monotonic())
        why = poisoned_mean(result, self.round_subs.get(a.round_id))
        if why is not None:
            # A member contributed NaN, inf or a huge update: the round fails
            # (all or nothing: nobody applies it) and the coordinator traces
            # the sender (suspicion.py). The finite check is the same at every
            # participant; the size check compares with each one's own part.
            self.nonfinite_rounds += 1
            self.round_subs.pop(a.round_id, None)
            log.warning("%s round %d: the mean %s; failing the round", self.id[:8],
                        a.round_id, why)
            self._dispatch(self.core.collective_finished(time.monotonic(), a.round_id, False,
                                                         poisoned=True))
            self._retry("nonfinite")
            return
        self.pending[a.round_id] = result
        digest = hash_tensor(result).to_bytes(8, "little")  # native XXH64, no copy
        self._dispatch(self.core.collective_finished(time.monotonic(), a.round_id, True, digest))

    def _apply(self, a: r.ApplyResult) -> None:
        result = self.pending.pop(a.round_id, None)
        sub = self.round_subs.pop(a.round_id, None)
        if result is None:
            # Decided "apply" but we hold no result: stay where we are; the
            # parity check sees the swarm ahead of us and fetches its state.
            log.warning("%s has no result for applied round %d", self.id[:8], a.round_id)
            self.core.state_synced(self.state.step, self.state.state_hash())
            return
        if sub is not None and sub is self.submission:
            self._next_submission()
        # The caller's apply (an outer optimizer step: heavy) and the hash of
        # the new state run on a worker, so heartbeats go on meanwhile. Until
        # it is done nothing on the loop reads the state: serving it, syncing
        # over it and new rounds wait for `applying` to clear.
        self.applying = True
        state = self.state
        fut = self.loop.run_in_executor(None, _apply_on, state, sub, result, a.step + 1)
        fut.add_done_callback(lambda f: self._applied(a, sub, result, state, f))

    def _applied(self, a: r.ApplyResult, sub: Submission | None, result: torch.Tensor,
                 state: SharedState, fut) -> None:
        """On the loop, after _apply_on: the state is at a.step + 1."""
        self.applying = False
        digest, error = fut.result()
        if self.closing:
            return
        if error is not None:
            # The state may be half-updated: its hash will differ from the
            # swarm's and the parity check repairs it; the caller hears why.
            log.error("%s apply of round %d failed: %r", self.id[:8], a.round_id, error)
        self.core.result_applied(state.step, digest)
        self._save_record()
        self.rounds_applied += 1
        self.round_gaps.append(time.monotonic() - self.last_applied_at)
        self.last_applied_at = time.monotonic()
        log.debug("%s step %d applied (round %d) state %s", self.id[:8], self.state.step,
                 a.round_id, digest.hex())
        if self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0 \
                and not self.checkpointing:
            # Written from a copy on a worker: fsyncing a large state on the
            # loop would hold up heartbeats long enough to get us evicted.
            snap = SharedState(self.state.step)
            snap.tensors = {k: t.clone() for k, t in self.state.tensors.items()}
            self.checkpointing = True
            fut = self.loop.run_in_executor(None, self._write_checkpoint, snap)
            fut.add_done_callback(lambda f: self._checkpoint_done(f))
        if sub is not None:
            _settle(sub.future, result=result, exc=error)
        self._schedule_ready(0.0)

    def _write_checkpoint(self, state: SharedState) -> float:
        started = time.monotonic()
        checkpoint.save(state, self.cfg.data_dir / CHECKPOINT_FILE)
        return time.monotonic() - started

    def _checkpoint_done(self, fut) -> None:
        self.checkpointing = False
        self.stats.checkpoint_done(fut.exception() is None,
                                   fut.result() if fut.exception() is None else 0.0)
        if fut.exception() is not None:
            log.warning("%s checkpoint failed: %s", self.id[:8], fut.exception())

    def _checkpoint_now(self) -> None:
        """At shutdown, on the loop: nothing else runs then. A checkpoint that
        cannot be written (its path is a directory, the disk is full) is
        logged: the shutdown goes on, and the applied record still says
        which step this peer reached."""
        try:
            self._write_checkpoint(self.state)
        except (OSError, checkpoint.CheckpointError) as e:
            log.error("%s could not write its checkpoint on the way out: %s", self.id[:8], e)

    # ------------------------------------------------------------ state sync

    async def _sync(self, need: r.SyncNeeded) -> None:
        """Fetch and install the state the core asked for (statesync.StateTransfers)."""
        started = time.monotonic()
        try:
            state = await self.transfers.fetch(need)
        except BadState as e:
            self.sync_failures += 1
            self.bad_states += 1
            liars = self.core.refuse_state(time.monotonic(), need.step, need.state_hash)
            log.warning("%s refused the state of step %d: %s; distrusting the peers that "
                        "announced it: %s", self.id[:8], need.step, e,
                        ", ".join(p[:8] for p in liars) or "none")
            self.core.sync_failed()
            return
        except SyncFailed as e:
            self.sync_failures += 1
            log.info("%s state sync failed: %s", self.id[:8], e)
            self.core.sync_failed()
            return
        finally:
            self.syncing = False
            self.stats.durations.observe("state_sync", time.monotonic() - started)
        step, digest = state.step, state.state_hash()
        self.state = state
        self.syncs += 1
        self.last_applied_at = time.monotonic()
        self.core.state_synced(step, digest)
        self._save_record()
        log.info("%s synced to step %d from %d donors", self.id[:8], step,
                 min(len(need.donors), MAX_DONORS))
        # every contribution waiting was made against the state just dropped
        self._fail_submissions(StateReplaced(step))

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


def _apply_on(state: SharedState, sub: Submission | None, result: torch.Tensor,
              step: int) -> tuple[bytes, BaseException | None]:
    """Worker thread: the caller's apply (even for a contribution already
    failed with StateReplaced: the round applied everywhere, and the callback
    keeps us in parity), the new step, and the new state's hash."""
    error = None
    if sub is not None and sub.apply is not None:
        try:
            sub.apply(state, result)
        except Exception as e:  # noqa: BLE001 - reported to the caller, not the loop
            error = e
    state.step = step
    return state.state_hash(), error


def _settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Sets a caller's future once; a future the caller cancelled is left alone."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
