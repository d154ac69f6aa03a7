"""DiLoCo with the outer all-reduce overlapped with a whole inner phase.

Two variants (spec sheet §5.1 and §5.2); both send round t's pseudo-gradient
and go straight on with the next H inner steps, so communication may take as
long as an inner phase without stalling compute.

1. One-step-delayed ("async") DiLoCo, as in PCCL (PrimeIntellect-ai/pccl,
   docs "AsyncDiloco" and examples/nanogpt_diloco/async_diloco.py; PCCL tech
   report arXiv:2505.14065). Per outer iteration t:

       H inner steps on θ_local             # θ_local started equal to θ_outer
       join round t−1                       # its apply did θ_outer ← OuterOpt(θ_outer, Δ̄(t−1))
       Δ_i(t) ← θ_start − θ_local           # w.r.t. the NOT-yet-updated outer params
       θ_local ← θ_outer                    # this round's progress lives only in Δ_i(t)
       launch the all-reduce of Δ_i(t)      # overlaps the next H inner steps

   θ_start (a local fp32 copy of the outer params the phase started from) is
   what makes the order of "join" and "Δ" irrelevant: round t−1's apply may
   run on the peer's thread at any time during phase t. Every outer update is
   one round stale; the outer state is shared, byte-identical on all peers.

2. Eager updates (Kale, Douillard, Donchev, arXiv:2502.12996). The delayed
   average is completed with the replica's own fresh pseudo-gradient:

       Δ̂_m(t) = (1/M)·Δ_m(t) + (1/M)·Σ_{m'≠m} Δ_{m'}(t−1)
              = Δ̄(t−1) + (Δ_m(t) − Δ_m(t−1)) / M
       θ_m ← OuterOpt_m(θ_m, Δ̂_m(t))  at once; the next phase starts from θ_m

   [UNVERIFIED] The sheet rebuilt this formula from summaries of the paper,
   not from its §3 equations; it is implemented exactly as the sheet writes
   it. Each replica's own contribution enters one round early and is taken
   back out when the true mean arrives, so over time each contribution
   counts once.

   By design the eager outer params θ_m and their optimizer state differ
   across replicas, so they are LOCAL (not in the SharedState, not checked
   for parity). What is SHARED is the consensus trajectory that the delayed
   means define, updated in the all-reduce's apply exactly as in variant 1
   (`outer/`, `outer_opt/`): it is what a joiner or a replaced replica
   restarts from (θ_m and its optimizer state are then copied from it), and
   the model to evaluate or checkpoint as "the swarm's".
   M is the number of members of the round just joined (`peer.members()`).

Both use DiLoCo's shared-state layout: `DiLoCo.initial_state(model, outer)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from peerlearn.algorithms.diloco import (
    OUTER,
    OUTER_OPT,
    DiLoCo,
    OuterLoop,
    check_layout,
    default_outer,
)
from peerlearn.algorithms.outer import OuterOptimizer, sub_state


def _local_fp32(params: Mapping[str, nn.Parameter], names) -> dict[str, torch.Tensor]:
    return {n: params[n].detach().to("cpu", torch.float32) for n in names}


class AsyncDiLoCo(OuterLoop):
    """One-step-delayed DiLoCo; call `step()` after every inner `optimizer.step()`."""

    initial_state = staticmethod(DiLoCo.initial_state)

    def __init__(self, peer, model: nn.Module, inner_optimizer, *, H: int,
                 outer: OuterOptimizer | None = None, timeout: float | None = None):
        if H < 1:
            raise ValueError("H must be >= 1")
        super().__init__(peer, model, inner_optimizer, timeout=timeout)
        self.H = H
        self.outer = outer if outer is not None else default_outer()
        check_layout(self._state(), self.params, self.names, OUTER_OPT, self.outer)
        self._pending = None  # round t−1, in flight
        self._start: dict[str, torch.Tensor] = {}  # θ_start: the outer params phase t began from
        self.reload()

    make_apply = DiLoCo.make_apply  # θ_outer ← OuterOpt(θ_outer, Δ̄) on the shared state
    weighted = False

    def reload(self) -> None:
        super().reload()
        state = self._state()
        self._start = {n: state.tensors[OUTER + n].clone() for n in self.names}
        self._pending = None

    def step(self) -> bool:
        """One inner step done. Returns True when a (delayed) outer step landed."""
        self.inner_steps += 1
        self.local_steps += 1
        if self.local_steps % self.H:
            return False
        local = _local_fp32(self.params, self.names)
        delta = {n: self._start[n] - local[n] for n in self.names}  # Δ_i(t)
        landed = self._join()
        if landed is None:
            return False  # state replaced: Δ_i(t) was against a state that is gone
        self.reload()  # θ_local ← θ_outer (with Δ̄(t−1) applied)
        self._pending = self.peer.all_reduce_async(delta, apply=self.make_apply())
        return landed

    def _join(self) -> bool | None:
        """Waits for round t−1. True: it applied; False: none or skipped;
        None: our state was replaced (the model is already reloaded)."""
        landed = False
        if self._pending is not None:
            pending, self._pending = self._pending, None
            replaced = self.replaced
            landed = self._wait(pending)
            if self.replaced != replaced:
                return None
            if landed:
                self.outer_steps += 1
                self._base_step += 1
        if self._state_moved():  # replaced between our own calls
            self.replaced_by_swarm()
            return None
        return landed


class EagerDiLoCo(AsyncDiLoCo):
    """Eager updates [UNVERIFIED formula, see the module docstring]. The model
    trains from the local eager outer params θ_m; the shared state holds the
    consensus (delayed) trajectory."""

    def reload(self) -> None:
        super().reload()  # model ← consensus; θ_start ← consensus
        state = self._state()
        # θ_m and its optimizer state restart from the consensus.
        self._theta = {n: t.clone() for n, t in self._start.items()}
        self._opt_state = {k: t.clone() for k, t in sub_state(state.tensors, OUTER_OPT).items()}
        self._prev: dict[str, torch.Tensor] | None = None  # Δ_m(t−1), as sent

    def step(self) -> bool:
        self.inner_steps += 1
        self.local_steps += 1
        if self.local_steps % self.H:
            return False
        local = _local_fp32(self.params, self.names)
        delta = {n: self._theta[n] - local[n] for n in self.names}  # Δ_m(t)
        landed = self._join()
        if landed is None:
            return False
        M = max(1, len(self.peer.members()))
        if landed and self._prev is not None:
            mean = self.last_mean  # Δ̄(t−1)
            eager = {n: mean[n] + (delta[n] - self._prev[n]) / M for n in self.names}
        else:
            # No delayed mean (first round, or round t−1 was skipped): only our
            # own fresh contribution, at the weight it has in a mean.
            eager = {n: delta[n] / M for n in self.names}
        self.outer.step(self._theta, eager, self._opt_state)  # θ_m ← OuterOpt_m(θ_m, Δ̂_m(t))
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(self._theta[n])
        self.local_steps = 0
        self._base_step = self._state().step
        self._prev = delta
        self._pending = self.peer.all_reduce_async(delta, apply=self.make_apply())
        return True


__all__ = ["AsyncDiLoCo", "EagerDiLoCo"]
