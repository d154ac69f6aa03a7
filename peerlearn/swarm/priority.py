"""The daemon's bulk threads yield the CPU to its event loop.

The loop answers heartbeats and runs the round protocol; a peer whose loop
wakes late looks dead to the others (`dead_after`). On a machine with fewer
cores than busy threads (3 peers and their rings on 2 cores in `peerlearn
bench statesize`; a trainer's data loaders beside one peer) the loop's tick
woke up to 0.45 s late, waiting behind the daemon's own bulk work: ring
transfers and sums, hashing and applying the state, state pushes. Those run
on threads made by `bulk_executor`, whose nice value is raised by BULK_NICE
(the threads they start inherit it, the ring's lanes included), so the
scheduler hands a waking loop the CPU first. The caller's training threads
are left alone.

Linux only (elsewhere a thread's priority is the process's); raising one's
own nice value needs no privilege, and a failure leaves the thread as it was.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

BULK_NICE = 5  # CFS weight 1024 -> 335: a third of a nice-0 thread's share


def lower_this_thread(by: int = BULK_NICE) -> None:
    """Raises the calling thread's nice value by `by` (Linux; else nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        pass


def bulk_executor(max_workers: int | None, thread_name_prefix: str) -> ThreadPoolExecutor:
    """A pool whose threads run at BULK_NICE below the loop's priority."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix=thread_name_prefix,
                              initializer=lower_this_thread)
