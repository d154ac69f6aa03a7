"""The outbox: nothing dispatched after a record change runs before a record
written since is on disk; order is kept; the loop never writes."""

from __future__ import annotations

import asyncio
import threading

from peerlearn.swarm.outbox import RecordedOutbox


class Disk:
    """A record store whose writes block until the test lets them finish."""

    def __init__(self):
        self.version = 0  # what the core's record says now
        self.on_disk: list[int] = []
        self.gate = threading.Semaphore(0)
        self.threads: set[str] = set()

    def snapshot(self) -> int:
        return self.version

    def write(self, record: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.gate.acquire()
        self.on_disk.append(record)


async def settle(until=None, timeout: float = 10.0) -> None:
    """Lets the loop and the record thread run: until `until()` holds (at most
    timeout, for a busy machine), else a short while (for what must NOT happen)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(20):
        await asyncio.sleep(0.005)
    while until is not None and not until() and loop.time() < deadline:
        await asyncio.sleep(0.01)


def test_held_batches_wait_for_the_write_in_order_and_the_loop_never_writes():
    async def main():
        disk, ran = Disk(), []

        def execute(actions):
            ran.append((actions[0], list(disk.on_disk)))

        box = RecordedOutbox(disk.snapshot, disk.write, execute)
        runner = asyncio.create_task(box.run())
        box.dispatch(["a"])  # nothing outstanding: at once
        assert ran == [("a", [])]

        disk.version = 1
        box.changed()  # e.g. an ack: what follows waits for version 1 on disk
        box.dispatch(["b"])
        await settle()
        assert [r[0] for r in ran] == ["a"]  # held: the write is in flight
        disk.version = 2
        box.changed()  # changed again while the first write runs
        box.dispatch(["c"])
        disk.gate.release()  # the first write (version 1) ends
        await settle(lambda: len(ran) >= 2 and box.writes >= 1)
        # b waited for version 1 only; c needs a write started after its change.
        assert ran[1:] == [("b", [1])]
        disk.gate.release()
        await settle(lambda: len(ran) >= 3)
        assert ran[2:] == [("c", [1, 2])]
        await asyncio.wait_for(box.drained(), 1)
        box.dispatch(["d"])  # nothing outstanding again: at once
        assert ran[3:] == [("d", [1, 2])]
        assert disk.threads and all(t.startswith("peerlearn-record") for t in disk.threads)
        assert box.writes == 2
        runner.cancel()
        await box.close()

    asyncio.run(main())


def test_close_writes_what_is_outstanding_and_runs_nothing_held():
    async def main():
        disk, ran = Disk(), []
        box = RecordedOutbox(disk.snapshot, disk.write, lambda a: ran.append(a))
        disk.version = 7
        box.changed()  # no runner: as at shutdown, after the tasks were cancelled
        box.dispatch(["late"])
        disk.gate.release()
        await asyncio.wait_for(box.close(), 2)
        assert disk.on_disk == [7] and ran == []

    asyncio.run(main())


def test_a_write_that_raises_ends_the_runner_loudly_and_sends_nothing():
    """save_record logs and returns False on OSError; a write that raises is
    a bug, and it must end the runner (the daemon's task group) loudly."""
    async def main():
        ran = []

        def broken(_rec):
            raise RuntimeError("disk gone")

        box = RecordedOutbox(lambda: 1, broken, lambda a: ran.append(a))
        runner = asyncio.create_task(box.run())
        box.changed()
        box.dispatch(["x"])
        try:
            await asyncio.wait_for(runner, 2)
        except RuntimeError as e:
            assert "disk gone" in str(e)
        else:
            raise AssertionError("the runner swallowed the write's error")
        assert ran == []

    asyncio.run(main())
