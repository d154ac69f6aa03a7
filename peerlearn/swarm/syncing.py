"""Fetching the swarm's state when the core says ours is not it (part of
PeerDaemon, on its loop).

The core asks (SyncNeeded: a step, its hash, who announced it); one task,
`_sync`, fetches it from those donors (statesync.StateTransfers: verified
against the hash before anything takes it), hands it to the keeper, and
tells the core. A state that fails its check distrusts the peers that
announced it; a fetch that fails backs off, doubling per failure in a row.
Contributions made against the state just replaced fail with StateReplaced.
"""

from __future__ import annotations

import asyncio
import logging
import time

from peerlearn.swarm import rounds as r
from peerlearn.swarm.errors import StateReplaced
from peerlearn.swarm.statesync import MAX_DONORS, BadState, SyncFailed

log = logging.getLogger("peerlearn.peer")

# A failed state sync is retried after this, doubling per failure in a row.
SYNC_BACKOFF_S = 0.1
SYNC_BACKOFF_MAX_S = 2.0


class Syncing:
    """Mixed into PeerDaemon (which holds the attributes used here)."""

    async def _sync(self, need: r.SyncNeeded) -> None:
        """Fetch and install the state the core asked for (statesync.StateTransfers)."""
        try:
            await self._fetch_and_install(need)
        finally:
            self.sync_task = None

    async def _fetch_and_install(self, need: r.SyncNeeded) -> None:
        if self.round_task is not None:
            # A round is applying on the state thread: ask again once it is
            # done (the swarm may be where we are by then).
            await asyncio.wait({self.round_task})
            self.core.sync_failed()
            return
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
            self.sync_failed_in_a_row += 1
            log.info("%s state sync failed: %s", self.id[:8], e)
            # Asked again at once, donors still busy with (or waiting for the
            # links of) the fetch just given up refuse again, and joiners
            # arriving together kept each other out for minutes: back off.
            await asyncio.sleep(min(SYNC_BACKOFF_MAX_S,
                                    SYNC_BACKOFF_S * 2 ** (self.sync_failed_in_a_row - 1)))
            self.core.sync_failed()
            return
        finally:
            self.stats.durations.observe("state_sync", time.monotonic() - started)
        digest = await self.keeper.install(state)
        self.syncs += 1
        self.sync_failed_in_a_row = 0
        self.last_applied_at = time.monotonic()
        self.core.state_synced(state.step, digest)
        self._record_changed()
        log.info("%s synced to step %d from %d donors", self.id[:8], state.step,
                 min(len(need.donors), MAX_DONORS))
        # every contribution waiting was made against the state just dropped
        self._fail_submissions(StateReplaced(state.step))
