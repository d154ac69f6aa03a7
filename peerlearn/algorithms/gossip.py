"""Gossip averaging, plain or with variance correction
(Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems", arXiv:2404.04616, Algorithm 3;
reference code `twoentartian/DFL_torch`, py_src/model_variance_correct.py).

    every H inner steps, peer i with its group G for this round (|G| = n):
        for each parameter tensor l:
            l_avg ← (1/n) Σ_{j∈G} l_j                        # one gossip exchange
            if variance correction and l is corrected:
                σ²  ← (1/n) Σ_{j∈G} Var(l_j)                  # the target
                μ   ← mean(l_avg)
                l_avg ← (l_avg − μ)·sqrt(σ² / Var(l_avg)) + μ
        θ_i ← l_avg

Why: averaging n uncorrelated models (independent initialisations, early
gossip, a new joiner) shrinks every layer's variance by n and undoes its
initialisation's scale; the correction restores it. With a shared init and
small drift Var(l_avg) ≈ σ² and the correction is close to a no-op.

Settled open points (spec sheet §6, §9.7):
  * Target: the mean of the group's variances, self included. With a pair
    this is DFL_torch's FollowConservative(0.5) (its default averager is
    ConservativeModelAverager(0.5), equal to the plain mean for a pair), and
    it is symmetric: both members compute the same target from the same
    bytes, so a pair ends byte-identical, as plain averaging does.
    FollowOthers (the partner's variance only) would leave the two apart.
  * Var is unbiased (N − 1, `torch.var`, as DFL_torch). No ε: DFL_torch's
    1e-4 on both sides under-corrects small layers (78 % of the target for a
    Xavier 256×128 layer averaged 16 ways), and even the sheet's 1e-12 in the
    denominator alone is off by ε/Var; the one case ε guards against, a
    constant average, is left uncorrected instead.
  * Not corrected (still averaged): one-element tensors, parameters of
    normalisation layers (their gains and shifts are not drawn from an
    initialisation's distribution), tensors whose average is constant.
    Normalisation statistics are buffers and never leave a peer.
  * The variances travel in the same exchange as the parameters, each as one
    codec block of equal values (a block codec then decodes it exactly).

A failed exchange leaves the parameters as they are (counted); the inner
optimizer's state is local and kept. See `decentral.py` for the shared
state, the final merge and the fault handling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peerlearn.algorithms.decentral import GossipLoop, fp32_params, load_params, rms

VAR = "#var/"  # '#' sorts the variances before every parameter in the flat exchange
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
               *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def corrected_names(model: nn.Module) -> set[str]:
    """Parameters the correction applies to: all but one-element tensors and
    the parameters of normalisation layers."""
    skip = {f"{prefix}.{n}" if prefix else n
            for prefix, mod in model.named_modules() if isinstance(mod, NORM_LAYERS)
            for n, _ in mod.named_parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if p.numel() > 1 and n not in skip}


def variance_correct(avg: torch.Tensor, target: float) -> torch.Tensor:
    """avg rescaled around its mean to unbiased variance `target` (a new fp32
    tensor). Left as it is (a copy) where there is nothing to rescale: fewer
    than 2 elements, a constant avg, a target that is not positive and
    finite, or a scale that overflows. Computed in fp64, rounded once to
    fp32: a pure function of its inputs, so every member of a group gets the
    same bytes."""
    out = avg.detach().to(torch.float32).clone()
    if out.numel() < 2 or not (math.isfinite(target) and target > 0):
        return out
    x = out.double()
    var = float(x.var())
    if not (math.isfinite(var) and var > 0):
        return out
    scale = math.sqrt(target / var)
    if not math.isfinite(scale):
        return out
    mu = x.mean()
    return ((x - mu) * scale + mu).to(torch.float32)


class GossipAveraging(GossipLoop):
    """Decentralised SGD with gossip (`vc=True`: with variance correction).
    Call `step()` after every inner `optimizer.step()`; every H calls the
    model's parameters are averaged with this round's group."""

    def __init__(self, peer, model: nn.Module, inner_optimizer, *, H: int, config: dict,
                 vc: bool = False, **kw):
        super().__init__(peer, model, inner_optimizer, H=H, config=config, **kw)
        self.vc = vc
        self.corrected = sorted(corrected_names(model)) if vc else []

    def outer_step(self) -> None:
        theta = fp32_params(self.params, self.names)
        sent = dict(theta)
        for n in self.corrected:
            # One block of equal values: the group's mean of it is the target.
            sent[VAR + n] = torch.full((self.block_size,), float(theta[n].var()),
                                       dtype=torch.float32)
        mean = self.exchange(sent)
        if mean is None:
            return  # no averaging this time: the model trains on as it is
        self.log_distance(rms(theta, mean, self.names))
        avg = {n: mean[n] for n in self.names}
        for n in self.corrected:
            avg[n] = variance_correct(avg[n], float(mean[VAR + n][0]))
        load_params(self.params, avg, self.names)


__all__ = ["GossipAveraging", "corrected_names", "variance_correct"]
