"""The caller's contributions and the rounds that carry them (part of
PeerDaemon, on its loop).

`submit` queues a Submission; the first one leads: this peer sends Ready
with it, and when the core starts a round (StartCollective) one coroutine,
`_round`, runs that round from start to end:

    collective on a worker  (the ring or the all-gather and the rule; the
                             result checked and hashed there too)
    -> Done                 (core.collective_finished)
    -> the decision         (a future the core's ApplyResult/DiscardResult settles)
    -> apply                (the state thread, keeper.py: callback, step, hash)
    -> record and settle    (applied.json, then the caller's future)

A round that ends without applying goes again with the same contribution
(`_retry`), unless the caller withdrew it. Nothing here reads the state's
bytes on the loop, and no flag says what runs: the round task does (a
second round cannot start while it exists), the keeper orders the state's
users.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

from peerlearn.swarm import rounds as r
from peerlearn.swarm.allreduce import AllReduceAborted
from peerlearn.swarm.collective import run_collective, stalled_neighbour
from peerlearn.swarm.config import Submission
from peerlearn.swarm.contributions import Settle
from peerlearn.swarm.errors import ContributionLost
from peerlearn.swarm.records import CHECKPOINT_FILE
from peerlearn.transport.stream import StreamError

log = logging.getLogger("peerlearn.peer")


class Contributing:
    """Mixed into PeerDaemon (which holds the attributes used here)."""

    # ------------------------------------------------------------ queue
    # Which contribution goes into which round, and how each ends, is decided
    # by the sans-IO Contributions (contributions.py); here it is carried out.

    def submit(self, sub: Submission) -> None:
        """On the loop: take part in rounds with sub until one applies it.

        Contributions submitted while one is pending wait behind it and go
        into later rounds, one round each, in submission order.
        """
        if self.closing:
            settle(sub.future, exc=self.closed_error())
            return
        if self.contribs.submit(sub):
            self._schedule_ready(0.0)

    def withdraw(self, sub: Submission) -> None:
        """On the loop: the caller gave up on sub. A round already running with
        it still completes (and applies it) for everyone's sake."""
        running = self.round_task is not None or self.core.active is not None
        if sub is self.submission:
            self.core.not_ready()  # our Ready may be out: no new round may count on it
        self._carry_out(self.contribs.withdraw(sub, running))

    @property
    def submissions(self):
        """Contributions in submission order; the first is the one rounds run with."""
        return self.contribs.queue

    @property
    def submission(self) -> Submission | None:
        """The contribution rounds run with now (the first submitted)."""
        return self.contribs.leader

    def _carry_out(self, decisions: list[Settle]) -> None:
        for d in decisions:
            settle(d.sub.future, result=d.result, exc=d.error)
            # Settled, the buffer is the caller's again (or garbage): not
            # kept alive by the Submission, which the caller's frames and a
            # failed future's traceback may hold in a cycle for a while.
            d.sub.tensor = None
        if decisions and self.contribs.leader is not None:
            self._schedule_ready(0.0)  # the next one leads

    def _fail_submissions(self, exc: BaseException) -> None:
        """Every contribution, the leading one and those queued, fails with exc."""
        self._carry_out(self.contribs.fail_all(exc))

    def _retry(self, reason: str, spent: int | None = None) -> None:
        """A round ended without applying (reason: stats.RETRY_REASONS): go again
        (with the same contribution, unless the caller withdrew it: the round's
        end tells Contributions). spent: that round's id when it reduced into
        its contribution in place: that one fails, and the next one leads."""
        self.stats.retried(reason)
        if spent is not None:
            lost = self.contribs.round_spent(spent, ContributionLost(
                f"round {spent} ended without applying ({reason}) after reducing this "
                "contribution in place"))
            if lost:
                log.info("%s round %d reduced its contribution in place and did not apply: "
                         "the contribution is lost (ContributionLost)", self.id[:8], spent)
            self.stats.lost_contributions += len(lost)
            self._carry_out(lost)
        self._schedule_ready(0.0)

    # ------------------------------------------------------------ Ready

    def _schedule_ready(self, delay: float) -> None:
        if self.closing:
            return
        if self.ready_handle is not None:
            self.ready_handle.cancel()
        self.ready_handle = self.loop.call_later(delay, self._start_ready)

    def _start_ready(self) -> None:
        self.ready_handle = None
        if self._may_be_ready() and self.ready_task is None:
            self.ready_task = self.spawn(self._ready())

    def _may_be_ready(self) -> bool:
        return self.state is not None and self.sync_task is None and self.round_task is None \
            and self.core.active is None and self.contribs.offer() is not None

    async def _ready(self) -> None:
        """Ready with the state's hash, read again on the state thread (a drift
        written since the last hash is seen; an unchanged state costs nothing)."""
        try:
            step, digest = await self.keeper.rehash()
        finally:
            self.ready_task = None
        if self._may_be_ready() and step == self.keeper.step:
            self._dispatch(self.core.local_ready(time.monotonic(), step, digest))

    # ------------------------------------------------------------ a round

    def _start_round(self, a: r.StartCollective) -> None:
        # The round's apply and result belong to the contribution it starts
        # with, whatever leads by the time it applies.
        sub = self.contribs.round_started(a.round_id)
        self.round_task = self.spawn(self._round(a, sub))

    async def _round(self, a: r.StartCollective, sub: Submission | None) -> None:
        try:
            await self._run_round(a, sub)
        finally:
            self.round_task = None
            self.decisions.pop(a.round_id, None)
            if a.round_id in self.contribs.carried:  # ended without applying
                self._carry_out(self.contribs.round_failed(a.round_id))
            self._schedule_ready(0.0)

    async def _run_round(self, a: r.StartCollective, sub: Submission | None) -> None:
        started = time.monotonic()
        try:
            outcome = await self.loop.run_in_executor(
                None, run_collective, self.links, self.cfg, self.id, a,
                None if sub is None else sub.tensor, self.inflight_links)
        except (AllReduceAborted, StreamError, TimeoutError, OSError) as e:
            blame = stalled_neighbour(e, self.id, a.participants)
            log.info("%s collective %d failed: %s%s", self.id[:8], a.round_id, e,
                     f" (the link with {blame[:8]} stalled)" if blame else "")
            self._dispatch(self.core.collective_finished(time.monotonic(), a.round_id, False,
                                                         blame=blame))
            self._retry("collective_failed", a.round_id if getattr(e, "spent", False) else None)
            return
        finally:
            self.inflight_links.pop(a.round_id, None)
            self.stats.durations.observe("all_reduce", time.monotonic() - started)
        spent = a.round_id if outcome.spent else None
        if self.core.active is None or self.core.active.round_id != a.round_id:
            self._retry("superseded", spent)  # decided (aborted) while we were still at it
            return
        for culprit in outcome.refused:
            # The robust rule left its NaN row out; the coordinator (if it is
            # us) shuts the sender out as it does a traced poisoner.
            self.refused_contributions += 1
            log.warning("%s round %d: %s contributed non-finite values; left out",
                        self.id[:8], a.round_id, culprit[:8])
            self.core.contribution_refused(culprit, time.monotonic())
        if outcome.poisoned is not None:
            # A member contributed NaN, inf or a huge update: the round fails
            # (all or nothing: nobody applies it) and the coordinator traces
            # the sender (suspicion.py). The finite check is the same at every
            # participant; the size check compares with each one's own part.
            self.nonfinite_rounds += 1
            log.warning("%s round %d: the mean %s; failing the round", self.id[:8],
                        a.round_id, outcome.poisoned)
            self._dispatch(self.core.collective_finished(time.monotonic(), a.round_id, False,
                                                         poisoned=True))
            self._retry("nonfinite", spent)
            return
        # Registered before Done goes out: a round of one decides at once.
        decision = self.decisions[a.round_id] = self.loop.create_future()
        self._dispatch(self.core.collective_finished(time.monotonic(), a.round_id, True,
                                                     outcome.digest))
        applied = await decision  # an ApplyResult, or None: aborted
        if applied is None:
            self._retry("aborted", spent)
            return
        await self._apply(applied, sub, outcome.value)

    def _decided(self, round_id: int, applied: r.ApplyResult | None) -> bool:
        """The core decided a round: wake its task. False if none waits (we
        hold no result for it)."""
        fut = self.decisions.get(round_id)
        if fut is None or fut.done():
            return False
        fut.set_result(applied)
        return True

    async def _apply(self, a: r.ApplyResult, sub: Submission | None, result) -> None:
        """The caller's apply (an outer optimizer step: heavy) and the new
        state's hash run on the state thread; heartbeats go on meanwhile, and
        no Ready, sync or serve reads the state before they are done."""
        digest, error = await self.keeper.apply(sub, result, a.step + 1)
        if self.closing:
            return
        if error is not None:
            # The state may be half-updated: its hash will differ from the
            # swarm's and the parity check repairs it; the caller hears why.
            log.error("%s apply of round %d failed: %r", self.id[:8], a.round_id, error)
        self.core.result_applied(a.step + 1, digest)
        self._record_changed()
        self.rounds_applied += 1
        self.round_gaps.append(time.monotonic() - self.last_applied_at)
        self.last_applied_at = time.monotonic()
        log.debug("%s step %d applied (round %d) state %s", self.id[:8], a.step + 1,
                  a.round_id, digest.hex())
        if self.cfg.checkpoint_every and (a.step + 1) % self.cfg.checkpoint_every == 0 \
                and self.checkpoint_task is None:
            self.checkpoint_task = self.spawn(self._checkpoint())
        self._carry_out(self.contribs.round_applied(a.round_id, result, error))

    async def _checkpoint(self) -> None:
        """Written from the live state on the state thread (no copy): an apply
        arriving meanwhile waits for it."""
        try:
            seconds = await self.keeper.checkpoint(self.cfg.data_dir / CHECKPOINT_FILE)
            self.stats.checkpoint_done(True, seconds)
        except Exception as e:  # noqa: BLE001 - disk full, a directory in the way: go on
            self.stats.checkpoint_done(False, 0.0)
            log.warning("%s checkpoint failed: %s", self.id[:8], e)
        finally:
            self.checkpoint_task = None


def settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Sets a caller's future once; a future the caller cancelled is left alone."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
