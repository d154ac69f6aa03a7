"""What a peer is configured with, and what a caller hands the daemon to reduce."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peerlearn.state.shared import SharedState
from peerlearn.swarm.actions import Timeouts
from peerlearn.transport.swarm_secret import check_secret


@dataclass
class PeerConfig:
    data_dir: Path
    secret: bytes | None  # None: an allowlist swarm (then allowlist is required)
    host: str = "127.0.0.1"  # bound and advertised
    control_port: int = 0
    data_port: int = 0
    join: str | None = None  # host:port of any member's control socket; None founds a swarm
    timeouts: Timeouts = field(default_factory=Timeouts)
    codec: int | None = None
    block_size: int = 64
    n_conns: int = 4
    # The ring all-reduce runs this many lanes, one per connection by default
    # (see swarm.allreduce). Like codec, it must be the same at every peer.
    ring_lanes: int = 4
    checkpoint_every: int = 10
    step_timeout: float = 30.0  # one all-reduce step may take this long
    allowlist: list[bytes] | None = None  # Ed25519 public keys admitted (raw 32 bytes)
    # A joiner gives up (JoinTimeout) when no member answers within this; None: never.
    join_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        # Refused here, before any socket or file exists, with the rule's
        # one-line reason (WeakSecretError, a ValueError).
        if self.secret is not None:
            self.secret = check_secret(self.secret)
        if not 1 <= self.ring_lanes <= self.n_conns:
            raise ValueError("ring_lanes must be between 1 and n_conns (one connection a lane)")


@dataclass(eq=False)
class Submission:
    """One contribution waiting for a round.

    tensor: flat contiguous fp32, owned by the daemon until the future is
    settled (it is only read). apply(state, mean) runs on the loop thread
    when a round applies; it must be deterministic (every peer runs it on
    identical inputs) and must not block for long (heartbeats wait on it).
    The future gets the mean, or StateReplaced / PeerClosed.
    """

    tensor: torch.Tensor
    apply: Callable[[SharedState, torch.Tensor], None] | None
    future: Future = field(default_factory=Future)
    withdrawn: bool = False  # the caller gave up: take part in no new round
