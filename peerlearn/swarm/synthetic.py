"""The built-in synthetic workload: exercises the whole runtime with no model.

Each round every participant derives a local update from its own "data",
seeded by its peer id and the step, the swarm all-reduces the updates (mean)
and every participant adds the mean to the shared parameters. Everything is
deterministic, so every peer that applies round s holds the same bytes, and a
test can recompute the expected state from the list of participants alone.
The training issue replaces this with real training behind the same daemon.
"""

from __future__ import annotations

import hashlib

import torch

from peerlearn.state.shared import SharedState


class SyntheticWorkload:
    def __init__(self, numel: int = 1 << 18, compute_s: float = 0.5, scale: float = 0.01):
        self.numel = numel
        self.compute_s = compute_s  # stands in for the inner training steps
        self.scale = scale

    def initial_state(self) -> SharedState:
        state = SharedState(step=0)
        g = torch.Generator().manual_seed(0)
        state.register("params", torch.randn(self.numel, generator=g))
        return state

    def local_update(self, peer_id: str, step: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.blake2b(f"{peer_id}/{step}".encode(),
                                              digest_size=8).digest(), "little") >> 1
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.numel, generator=g).mul_(self.scale)  # no second buffer

    def apply(self, state: SharedState, mean_update: torch.Tensor) -> None:
        state.tensors["params"].add_(mean_update.view(-1))
