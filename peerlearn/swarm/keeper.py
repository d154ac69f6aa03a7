"""The one owner of the shared state's bytes: the daemon's state thread.

Who touches the state, and when (issue 17: before, the loop hashed it on
every Ready and cloned it for checkpoints and donors, a worker applied
rounds, and nothing ordered them):
  * Every read or write of the tensors' bytes by the daemon runs on this
    keeper's single thread, in the order asked: a round's apply (the
    caller's callback), the hash of the new state, a checkpoint write, a
    donor's snapshot, the install of a fetched state. One thread, so no two
    of them overlap and no lock or flag is needed; the loop only awaits
    their futures and never spends time proportional to the model.
  * The loop reads `step` and `digest`, which change only on the loop (when
    an awaited job's result comes back), and `state`, the live object, to
    hand it on, never its bytes.
  * The caller's thread (api.Peer.state, an algorithm computing its next
    contribution) reads the tensors between its own calls; it writes them
    only through apply callbacks, which run here.

Copies: a checkpoint is written from the live tensors (none); a donor's
push reads the live tensors too, on a loan (below); an apply allocates what
the caller's callback allocates. A snapshot (one copy at most, made here,
shared by every push while any runs, dropped when its last push ends) is
made only for a requester whose loan an apply cut.

Loans (issue 17: the donor's copy was a fourth state-sized buffer beside
the state, the contribution and the round's result, 4x the state at the
peak): a push borrows the live tensors while its bytes are on the wire
(`lend`, a job here, so it sees the state between two applies). Applies
write the state, so an apply first waits for the loans out, at most
LEND_WAIT_S, then cuts the ones left (their links are aborted: the
requester's fetch fails as a transfer, never as a wrong state) and waits
for them to end. Reads (hashes, checkpoints) share the state with loans;
an install replaces the state object and leaves the lent tensors as they
are.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from peerlearn.swarm.priority import bulk_executor
from pathlib import Path

import torch

from peerlearn.state import checkpoint
from peerlearn.state.shared import SharedState
from peerlearn.swarm.config import Submission

# How long a round's apply waits for pushes reading the live state before it
# cuts them. A round's gather waits max(2, dead_after) s for late Readies:
# a donor applying this much later still makes the next round.
LEND_WAIT_S = 1.0


class StateKeeper:
    def __init__(self, state: SharedState | None, loop: asyncio.AbstractEventLoop | None = None):
        self.state = state
        self.step = state.step if state is not None else 0
        # The state's hash as last computed here (None: not yet, or no state).
        self.digest: bytes | None = None
        self._thread = bulk_executor(1, "peerlearn-state")
        self._snap: tuple[int, bytes, tuple, dict[str, torch.Tensor]] | None = None
        self.snapshot_users = 0  # pushes reading _snap
        self.loans = _Loans()  # pushes reading the live tensors
        self.loop = loop

    def _run(self, fn: Callable, *args) -> asyncio.Future:
        loop = self.loop or asyncio.get_running_loop()
        return loop.run_in_executor(self._thread, fn, *args)

    # ------------------------------------------------------------ jobs

    async def rehash(self) -> tuple[int, bytes]:
        """(step, hash) of the current state, read together on the state
        thread (every tensor whose version counter moved is read again: a
        drift written through torch is seen; an unchanged one costs nothing)."""
        state = self.state
        step, digest = await self._run(lambda: (state.step, state.state_hash()))
        if state is self.state:
            self.digest = digest
        return step, digest

    async def apply(self, sub: Submission | None, result: torch.Tensor,
                    step: int) -> tuple[bytes, BaseException | None]:
        """The caller's apply of a round's result, then the new step and hash.
        The callback runs even for a contribution already failed with
        StateReplaced: the round applied everywhere, and it keeps us in parity.
        A failing callback is returned, not raised: the state may be half
        updated, its hash then differs from the swarm's and the parity check
        repairs it."""
        state = self.state
        digest, error = await self._run(_apply_on, state, sub, result, step, self.loans)
        if state is self.state:
            self.step, self.digest = step, digest
        return digest, error

    async def install(self, state: SharedState) -> bytes:
        """A fetched, verified state becomes ours."""
        digest = await self._run(state.state_hash)  # kept hashes: no second read
        self.state, self.step, self.digest = state, state.step, digest
        self._snap = None
        return digest

    async def checkpoint(self, path: Path) -> float:
        """Writes the live state (no copy); applies wait meanwhile. Seconds."""
        return await self._run(_write, self.state, path)

    async def snapshot(self, min_step: int = 0
                       ) -> tuple[int, bytes, tuple, dict[str, torch.Tensor]] | None:
        """(step, hash, wire manifest, tensors) for donors, or None: busy.

        At most one copy exists: every push shares it while the next rounds
        apply. A push that starts while one is sent gets that copy if it is
        at min_step or later (an older state the swarm applied: the requester
        catches up from there), else None (the donor refuses; the requester
        asks again later). The caller calls `release_snapshot` when its push
        ends; the copy is dropped with the last one."""
        snap = self._snap
        current = snap is not None and snap[:2] == (self.step, self.digest)
        if not current and self.snapshot_users > 0 and (snap is None or snap[0] < min_step):
            return None
        self.snapshot_users += 1
        if snap is None or (not current and self.snapshot_users == 1):
            try:
                self._snap = await self._run(_copy, self.state)
            except BaseException:
                self.snapshot_users -= 1
                raise
        return self._snap

    def lend(self, step: int, digest: bytes, cut: Callable[[], None]) -> Loan | None:
        """From any thread but the loop's and this keeper's: a loan of the
        live tensors if the state is still at (step, digest) (what the push
        offered), else None. Blocks while the state thread finishes the job
        it runs. cut() is called (on the state thread) if an apply cannot
        wait for the loan's end: it must make the reader stop soon (abort its
        link); the reader calls `Loan.end` when it stops reading, cut or not."""
        return self._thread.submit(_lend, self, step, digest, cut).result()

    async def peek(self) -> tuple[int, bytes, tuple]:
        """(step, hash, wire manifest) of the live state, for an offer (kept
        hashes: reads nothing unless the state changed since the last hash)."""
        return await self._run(_peek, self.state)

    def release_snapshot(self) -> None:
        self.snapshot_users -= 1
        if self.snapshot_users == 0:
            self._snap = None  # the copy lives only while someone sends it

    async def verify(self, state: SharedState) -> tuple[bytes, str | None]:
        """Hash of a fetched state and the name of a tensor holding NaN or
        inf (None if all finite): read on the state thread, off the loop."""
        return await self._run(_verify, state)

    def close(self) -> None:
        """Waits for the job running, if any (never leaves the state half written)."""
        self._thread.shutdown(wait=True, cancel_futures=True)


class Loan:
    """The live tensors lent to one push (`StateKeeper.lend`)."""

    def __init__(self, loans: _Loans, step: int, digest: bytes, tensors: dict, cut):
        self._loans, self.step, self.digest, self.tensors = loans, step, digest, tensors
        self._cut, self.was_cut = cut, False

    def end(self) -> None:
        """The reader stopped reading (idempotent): an apply may write now."""
        self._loans.end(self)


class _Loans:
    """Loans out, shared by the state thread (which waits for them) and the
    push threads (which end them)."""

    def __init__(self):
        self.cv = threading.Condition()
        self.out: set[Loan] = set()
        self.cuts = 0  # loans an apply cut

    def end(self, loan: Loan) -> None:
        with self.cv:
            self.out.discard(loan)
            self.cv.notify_all()

    def settle(self, wait: float) -> None:
        """On the state thread, before a write: every loan ended, those still
        out after `wait` s cut first."""
        with self.cv:
            if self.cv.wait_for(lambda: not self.out, wait):
                return
            cut = list(self.out)
            self.cuts += len(cut)
        for loan in cut:
            loan.was_cut = True
            try:
                loan._cut()
            except Exception:  # noqa: BLE001 - the wait below still ends when it stops
                pass
        with self.cv:
            while self.out:
                # A cut reader fails within its link's abort; a second cut
                # covers a link that was not yet open at the first.
                if not self.cv.wait(1.0):
                    for loan in list(self.out):
                        try:
                            loan._cut()
                        except Exception:  # noqa: BLE001 - as above
                            pass


def _lend(keeper: StateKeeper, step: int, digest: bytes, cut) -> Loan | None:
    state = keeper.state
    if state is None or (state.step, state.state_hash()) != (step, digest):
        return None  # moved on since the offer: the push fails as a transfer
    loan = Loan(keeper.loans, step, digest, dict(state.tensors), cut)
    with keeper.loans.cv:
        keeper.loans.out.add(loan)
    return loan


def _peek(state: SharedState) -> tuple[int, bytes, tuple]:
    manifest = state.manifest()
    return (state.step, state.state_hash(manifest),
            tuple((e.name, e.dtype, e.shape, e.hash) for e in manifest))


def _apply_on(state: SharedState, sub: Submission | None, result: torch.Tensor,
              step: int, loans: _Loans) -> tuple[bytes, BaseException | None]:
    loans.settle(LEND_WAIT_S)  # no push reads what the callback writes
    error = None
    if sub is not None and sub.apply is not None:
        try:
            sub.apply(state, result)
        except Exception as e:  # noqa: BLE001 - reported to the caller, not the loop
            error = e
    state.step = step
    state.invalidate()  # the callback may have written around torch's counters
    return state.state_hash(), error


def _write(state: SharedState, path: Path) -> float:
    started = time.monotonic()
    checkpoint.save(state, path)
    return time.monotonic() - started


def _copy(state: SharedState):
    step, digest, wire = _peek(state)
    return step, digest, wire, {k: t.clone() for k, t in state.tensors.items()}


def _verify(state: SharedState) -> tuple[bytes, str | None]:
    bad = next((n for n, t in state.tensors.items() if not _finite(t)), None)
    return state.state_hash(), bad


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t. The max-norm is a reduction (NaN if any x is NaN,
    inf if any is infinite): torch.isfinite(t) made a bool tensor and an
    abs() temporary, 1.8 times the tensor (a joiner's peak)."""
    if not t.is_floating_point() or not t.numel():
        return True
    return math.isfinite(float(torch.linalg.vector_norm(t, ord=math.inf)))
