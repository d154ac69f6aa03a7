"""The data-parallel baseline: gradients averaged over the swarm every step
(synchronous data parallelism, the "DP" column of DiLoCo arXiv:2311.08105
Table 2 and Streaming DiLoCo arXiv:2501.18512 Table 1).

    repeat:
        g_i ← ∇f(x ~ D_i, θ_i)                   # loss.backward()
        g ← mean_i g_i                          # DDP.step(): one all-reduce
        θ_i ← InnerOpt(θ_i, g)                  # optimizer.step()

Invariant: if every replica starts from the same parameters and optimizer
state and runs a deterministic optimizer, the replicas stay bit-identical,
because every participant receives byte-identical means. Nothing is kept in
the shared state (each round only advances its step): this baseline has no
way to bring a joiner or a replica that missed a round back in line, so
faults are the caller's (CollectiveTimeout is raised, not skipped: a replica
that stepped on its own gradient would silently drift). For an elastic swarm
use DiLoCo with H=1, which with inner SGD is the same algorithm (tested) and
keeps the parameters in the shared state.
"""

from __future__ import annotations

import torch
from torch import nn

from peerlearn.swarm.errors import StateReplaced


class DDP:
    """Call `step()` after `loss.backward()` and before `optimizer.step()`:
    it replaces every `.grad` by the swarm's mean gradient."""

    def __init__(self, peer, model: nn.Module, *, timeout: float | None = None):
        self.peer, self.model, self.timeout = peer, model, timeout
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.steps = 0

    def step(self) -> None:
        grads = {}
        for n, p in self.params.items():
            # A parameter without a gradient this step contributes zeros, so
            # every replica sends the same names and sizes.
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[n] = g.detach()
        try:
            mean = self.peer.all_reduce(grads, timeout=self.timeout)
        except StateReplaced:
            # Nothing of ours lives in the shared state: just send again.
            mean = self.peer.all_reduce(grads, timeout=self.timeout)
        with torch.no_grad():
            for n, p in self.params.items():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(mean[n])
        self.steps += 1

    def metrics(self) -> dict[str, int]:
        return {"ddp_steps": self.steps}


__all__ = ["DDP"]
