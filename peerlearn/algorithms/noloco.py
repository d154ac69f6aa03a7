"""NoLoCo: No-all-reduce Low Communication training
(Kolehmainen et al., Gensyn, arXiv:2506.10911, §3.2; the update as the
authors' code `gensyn-ai/noloco` src/noloco/sparse_optimizer_c.py has it).

    every H inner steps, peer i, with G its group for this round (|G| = n):
        Δ_i      ← φ_i − θ_i                    # DiLoCo's sign: old minus new
        mean_φ   ← (1/n) Σ_{j∈G} φ_j            # one gossip exchange of (φ_j, Δ_j)
        mean_Δ   ← (1/n) Σ_{j∈G} Δ_j
        m_i      ← α·m_i − β·mean_Δ − γ·(φ_i − mean_φ)
        φ_i      ← φ_i + m_i
        θ_i      ← φ_i                          # the fast weights restart there

φ_i are the slow (outer) weights, θ_i the model's (fast) weights, m_i the
momentum; α = 0.5, β = 0.7, γ = 0.7 are the paper's and the code's defaults
(the code uses γ = β; the paper leaves γ open). The paper's Eq. 1-2 have
inconsistent signs (Δ = fast − slow, yet −βΔ); the code's form is the one
that trains, and the one written above, in DiLoCo's sign convention.

There is no barrier and no round: G is `Peer.gossip`'s seeded pairing of the
live members, a failed exchange (partner gone, partition, timeout) makes
this outer step a group of one (mean_φ = φ_i, mean_Δ = Δ_i: a local
heavy-ball step, DiLoCo's k = 1 "Lookahead" case), counted, and training
goes on. The γ term is what keeps replicas from drifting apart: it pulls
φ_i toward the group's mean at every exchange.

Nesterov (`nesterov=True`, not the authors' code): the paper calls α a
"Nesterov momentum", and DiLoCo's outer step is Nesterov. With
u ← −β·mean_Δ − γ·(φ_i − mean_φ) the update is then m ← α·m + u;
φ ← φ + u + α·m, which with G = everyone and equal φ is DiLoCo's Nesterov
outer step (lr β, momentum α) written in the descent direction (tested).
It exists because heavy-ball and Nesterov differ a lot over the few outer
steps of a short run (docs/algorithms.md, experiments).

Identity (tested): when G holds every peer and every φ_i is equal, the γ term
is exactly zero and the rule is heavy-ball DiLoCo with lr β and momentum α
(`outer.HeavyBall`), the same floating-point operations in the same order.

State: φ_i and m_i are fp32 on the CPU and local (they differ across peers
by design), kept in this peer's own checkpoint; see `decentral.py` for what
is shared. Every operation is a
deterministic fp32 CPU op in name order: the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import nn

from peerlearn.algorithms.decentral import GossipLoop, fp32_params, load_params, rms

PHI = "phi/"  # in the exchange: each member's slow weights
DELTA = "delta/"  # and its pseudo-gradient
MOMENTUM = "m/"  # in this peer's own checkpoint only


def noloco_update(phi: MutableMapping[str, torch.Tensor], m: MutableMapping[str, torch.Tensor],
                  mean_phi: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor],
                  *, alpha: float, beta: float, gamma: float) -> None:
    """m ← α·m − β·mean_Δ − γ·(φ − mean_φ);  φ ← φ + m  (in place, name order).

    The first two operations are `HeavyBall.step`'s own (m.mul_(α), then
    add_(Δ, alpha=−β)), so with φ = mean_φ (the added term is then −0.0,
    which leaves every float unchanged) the result is bitwise heavy-ball."""
    for n in sorted(phi):
        m[n].mul_(alpha).add_(mean_delta[n], alpha=-beta)
        m[n].add_(phi[n] - mean_phi[n], alpha=-gamma)
        phi[n].add_(m[n])


def noloco_nesterov_update(phi: MutableMapping[str, torch.Tensor],
                           m: MutableMapping[str, torch.Tensor],
                           mean_phi: Mapping[str, torch.Tensor],
                           mean_delta: Mapping[str, torch.Tensor],
                           *, alpha: float, beta: float, gamma: float) -> None:
    """u ← −β·mean_Δ − γ·(φ − mean_φ);  m ← α·m + u;  φ ← φ + u + α·m."""
    for n in sorted(phi):
        u = mean_delta[n].mul(-beta).add_(phi[n] - mean_phi[n], alpha=-gamma)
        m[n].mul_(alpha).add_(u)
        phi[n].add_(u).add_(m[n], alpha=alpha)


class NoLoCo(GossipLoop):
    """Call `step()` after every inner `optimizer.step()`; every H calls it
    averages with this round's group and takes NoLoCo's outer step.

        peer = Peer(cfg, initial_state=lambda: GossipLoop.initial_state(model, config))
        algo = NoLoCo(peer.start(), model, opt, H=50, config=config)
        for batch in data:
            loss(model, batch).backward(); opt.step(); opt.zero_grad()
            algo.step()
        algo.finish()                      # the final merge, if merge_at = -1
    """

    def __init__(self, peer, model: nn.Module, inner_optimizer, *, H: int, config: dict,
                 outer_lr: float = 0.7, momentum: float = 0.5, gamma: float = 0.7,
                 nesterov: bool = False, **kw):
        self.alpha, self.beta, self.gamma = float(momentum), float(outer_lr), float(gamma)
        self.update = noloco_nesterov_update if nesterov else noloco_update
        super().__init__(peer, model, inner_optimizer, H=H, config=config, **kw)

    def init_outer_state(self) -> None:
        self.phi = fp32_params(self.params, self.names)  # φ_i: starts at the model's params
        self.m = {n: torch.zeros_like(t) for n, t in self.phi.items()}

    def outer_state(self) -> dict[str, torch.Tensor]:
        return {**{PHI + n: t for n, t in self.phi.items()},
                **{MOMENTUM + n: t for n, t in self.m.items()}}

    def load_outer_state(self, tensors) -> None:
        self.phi = {n: tensors[PHI + n].clone() for n in self.names}
        self.m = {n: tensors[MOMENTUM + n].clone() for n in self.names}

    def outer_step(self) -> None:
        theta = fp32_params(self.params, self.names)
        delta = {n: self.phi[n] - theta[n] for n in self.names}
        sent = {PHI + n: self.phi[n] for n in self.names}
        sent.update({DELTA + n: delta[n] for n in self.names})
        mean = self.exchange(sent)
        if mean is None:  # no averaging this outer step: a group of one
            mean_phi, mean_delta = self.phi, delta
        else:
            mean_phi = {n: mean[PHI + n] for n in self.names}
            mean_delta = {n: mean[DELTA + n] for n in self.names}
            self.log_distance(rms(self.phi, mean_phi, self.names))
        self.update(self.phi, self.m, mean_phi, mean_delta,
                    alpha=self.alpha, beta=self.beta, gamma=self.gamma)
        load_params(self.params, self.phi, self.names)

    def after_merge(self) -> None:
        # The slow weights restart from the merge; the momentum is this peer's
        # own velocity and is kept (a merge at the end makes it moot).
        self.phi = fp32_params(self.params, self.names)


__all__ = ["NoLoCo", "noloco_nesterov_update", "noloco_update"]
