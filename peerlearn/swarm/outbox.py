"""The daemon's actions, held until the record they depend on is on disk.

The applied record (records.py: epoch, members, the highest round id and
term, step, hash) must be on disk before anything leaves that depends on it:
a restart that forgot an ack could ack a second proposal for the same step
(two hashes for one step; the property run found it), and one that forgot a
step or a departure would vote where it must not. That write is two fsyncs,
12 ms on this machine's disk and up to 140 ms while a checkpoint of 512 MB
is being written beside it (docs/benchmarks.md, "State size"); on the event
loop it held heartbeats and every handler for as long.

So the loop never writes it. `changed()` says the record moved on; every
batch of actions dispatched from then on waits, in order, until a record
written after that change is durable (the writer takes the core's record at
the moment it starts, which covers every change before it: its fields only
grow, so a newer record is as good as the one asked for). A batch
dispatched with nothing outstanding runs at once, as before.

Invariants:
  * Order: batches run in the order they were dispatched; none overtakes one
    held before it.
  * No action of a batch runs before every record change marked before its
    dispatch is on disk (or its write failed: logged and counted by the
    writer, as a synchronous write's failure was).
  * One owner: the loop calls everything here; the writes run on the
    outbox's own single thread, never the default executor (collectives
    occupy that one for seconds at a time).
  * `close()` writes what is outstanding and runs nothing more; the runner
    task ends with it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class RecordedOutbox:
    """See the module docstring. `snapshot()` returns the record to write (on
    the loop); `write(record)` makes it durable (on the outbox's thread);
    `execute(actions)` runs a batch (on the loop)."""

    def __init__(self, snapshot: Callable[[], object], write: Callable[[object], object],
                 execute: Callable[[list], None]):
        self._snapshot = snapshot
        self._write = write
        self._execute = execute
        self._held: deque[tuple[int, list]] = deque()  # (change it waits for, actions)
        self._changed = 0  # record changes marked
        self._written = 0  # changes covered by a durable record
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peerlearn-record")
        self.writes = 0
        self.longest_write_s = 0.0

    @property
    def pending(self) -> bool:
        return self._written < self._changed or bool(self._held)

    def changed(self) -> None:
        """The record moved on: batches dispatched from now wait for its write."""
        self._changed += 1
        self._idle.clear()
        self._wake.set()

    def dispatch(self, actions: list) -> None:
        if not self.pending:
            self._execute(actions)
            return
        if self._closed:
            return
        self._held.append((self._changed, actions))
        self._wake.set()

    async def drained(self) -> None:
        """Returns once every change is on disk and every held batch ran."""
        await self._idle.wait()

    async def run(self) -> None:
        """The writer: a task of the daemon's group, until close()."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while self.pending and not self._closed:
                if self._written < self._changed:
                    await self._write_now(loop)
                while self._held and self._held[0][0] <= self._written and not self._closed:
                    self._execute(self._held.popleft()[1])
            if not self.pending:
                self._idle.set()

    async def _write_now(self, loop: asyncio.AbstractEventLoop) -> None:
        target, record = self._changed, self._snapshot()
        started = loop.time()
        await loop.run_in_executor(self._pool, self._write, record)
        self.writes += 1
        self.longest_write_s = max(self.longest_write_s, loop.time() - started)
        self._written = max(self._written, target)

    async def close(self) -> None:
        """Writes any outstanding change (the last apply's step must survive a
        restart), drops held batches, ends the runner, joins the thread."""
        self._closed = True
        self._held.clear()
        self._wake.set()
        if self._written < self._changed:
            await self._write_now(asyncio.get_running_loop())
        self._idle.set()
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
