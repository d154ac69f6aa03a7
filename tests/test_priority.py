"""The daemon's bulk threads run below its event loop (swarm/priority.py)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from peerlearn.swarm.priority import BULK_NICE, bulk_executor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread nice values are Linux's")


def nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_bulk_threads_and_the_threads_they_start_yield_to_the_loop():
    mine = nice()

    def work() -> tuple[int, int]:
        seen = []
        lane = threading.Thread(target=lambda: seen.append(nice()))  # as a ring's lane
        lane.start()
        lane.join()
        return nice(), seen[0]

    with bulk_executor(2, "test-bulk") as pool:
        own, lane = pool.submit(work).result()
    assert own == lane == min(19, mine + BULK_NICE)
    assert nice() == mine  # the caller's thread is left alone
