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
snapshot is one copy at most, made here, shared by every push while any
runs (a request it is too old for waits), dropped when its last push ends;
an apply allocates what the caller's callback allocates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from peerlearn.state import checkpoint
from peerlearn.state.shared import SharedState
from peerlearn.swarm.config import Submission


class StateKeeper:
    def __init__(self, state: SharedState | None, loop: asyncio.AbstractEventLoop | None = None):
        self.state = state
        self.step = state.step if state is not None else 0
        # The state's hash as last computed here (None: not yet, or no state).
        self.digest: bytes | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="peerlearn-state")
        self._snap: tuple[int, bytes, tuple, dict[str, torch.Tensor]] | None = None
        self.snapshot_users = 0  # pushes reading _snap
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
        digest, error = await self._run(_apply_on, state, sub, result, step)
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


def _apply_on(state: SharedState, sub: Submission | None, result: torch.Tensor,
              step: int) -> tuple[bytes, BaseException | None]:
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
    manifest = state.manifest()
    wire = tuple((e.name, e.dtype, e.shape, e.hash) for e in manifest)
    return (state.step, state.state_hash(manifest), wire,
            {k: t.clone() for k, t in state.tensors.items()})


def _verify(state: SharedState) -> tuple[bytes, str | None]:
    bad = next((n for n, t in state.tensors.items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    return state.state_hash(), bad
