"""What RoundCore asks its driver to do, and the timeouts it runs on.

Plain values: the driver (the daemon, or the simulator in tests) executes
them; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerlearn.wire import control as m

ZERO_HASH = b"\0" * 8


@dataclass(frozen=True)
class Timeouts:
    heartbeat_every: float = 0.5
    dead_after: float = 3.0  # silence after which a peer is dead
    gather: float = 5.0  # after the first Ready, how long to wait for the rest
    ack: float = 3.0  # Propose -> every Ack
    collective: float = 300.0  # Commit -> every Done
    rejoin_grace: float = 10.0  # a founder resuming from a checkpoint waits this long for peers

    @classmethod
    def for_dead_after(cls, dead_after: float) -> Timeouts:
        """Timeouts scaled to one eviction bound: a few heartbeats per bound,
        and stragglers waited for no less than a peer takes to be evicted."""
        return cls(heartbeat_every=min(0.5, dead_after / 4), dead_after=dead_after,
                   gather=max(2.0, dead_after))


@dataclass(frozen=True)
class Applied:
    """What a peer writes to disk at every applied round, so a restart does
    not forget it (its checkpoint may be older): the view it applied, the
    highest round id and term it knew, and the step and hash it reached. A
    peer restarted with a record takes part in no round for an older step.
    departed: this peer left the view (Leave with departed); its members no
    longer include it, and it votes in no quorum until it applies a round."""

    epoch: int
    members: tuple[m.PeerInfo, ...]
    max_round_id: int
    term: int
    step: int
    state_hash: bytes
    departed: bool = False


@dataclass(frozen=True)
class Send:
    to: str
    msg: object


@dataclass(frozen=True)
class StartCollective:
    """Run the collective for round_id among participants (sorted; ring order)."""

    round_id: int
    step: int
    participants: tuple[str, ...]
    members: tuple[m.PeerInfo, ...]


@dataclass(frozen=True)
class ApplyResult:
    """Apply the held result of round_id; the shared state moves to step + 1."""

    round_id: int
    step: int


@dataclass(frozen=True)
class DiscardResult:
    round_id: int


@dataclass(frozen=True)
class SyncNeeded:
    """My state is not the swarm's: fetch (step, state_hash) from donors."""

    step: int
    state_hash: bytes
    donors: tuple[str, ...]


@dataclass(frozen=True)
class ViewChanged:
    epoch: int
    members: tuple[str, ...]
