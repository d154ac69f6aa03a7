"""Outer optimizers of the DiLoCo family, as pure updates over named fp32 tensors.

DiLoCo (Douillard et al., arXiv:2311.08105, Alg. 1) applies an "outer
optimizer" to the averaged pseudo-gradient Δ = θ_start − θ_local (old minus
new: it points like a gradient, so the update subtracts it). The paper's
choice is Nesterov momentum with exactly PyTorch's semantics
(`torch.optim.SGD(lr, momentum, nesterov=True, dampening=0)`), which every
reference implementation (torchft, OpenDiLoCo, prime) uses:

    if step == 0: b = g.clone()          # the buffer starts as the first gradient
    else:         b = μ·b + g
    θ = θ − η·(g + μ·b)

Invariants:
  * `step(params, grads, state)` changes `params` and `state` in place and
    nothing else; its result depends only on its inputs (no globals, no RNG),
    so every replica that runs it on identical bytes gets identical bytes.
    That is what lets it run inside an all-reduce's `apply` callback.
  * All optimizer state lives in the tensors `init_state` returns (momentum
    buffers and an int64 `step` that says whether the buffers are
    initialised): registered in a SharedState, parity checks and checkpoints
    cover it, and a joiner that fetches the state resumes bit-exactly.
  * The op order is PyTorch's single-tensor SGD (the CPU default), so results
    are bitwise equal to `torch.optim.SGD` on the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch

Tensors = Mapping[str, torch.Tensor]
State = MutableMapping[str, torch.Tensor]

STEP = "step"  # int64 scalar: outer steps applied so far (0 = buffers not initialised)


def _check(params: Tensors, grads: Tensors) -> None:
    if params.keys() != grads.keys():
        missing = sorted(set(params) ^ set(grads))
        raise KeyError(f"params and grads name different tensors: {missing[:5]}")


class SGD:
    """Plain outer SGD: θ = θ − η·Δ. With η = 1 this is FedAvg / Local SGD
    (the new θ is the mean of the replicas' parameters)."""

    def __init__(self, lr: float):
        self.lr = float(lr)

    def init_state(self, params: Tensors) -> dict[str, torch.Tensor]:
        return {STEP: torch.zeros((), dtype=torch.int64)}

    def step(self, params: Tensors, grads: Tensors, state: State) -> None:
        _check(params, grads)
        for name in sorted(params):
            params[name].add_(grads[name], alpha=-self.lr)
        state[STEP].add_(1)

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr})"


class Nesterov:
    """torch.optim.SGD(lr, momentum, nesterov=True, dampening=0, weight_decay=0).

    State: `step`, and `momentum/<name>` for each parameter (zeros until the
    first step, which copies the gradient in, as PyTorch does when its buffer
    is None)."""

    def __init__(self, lr: float, momentum: float):
        if momentum < 0:
            raise ValueError("momentum must be >= 0")
        self.lr, self.momentum = float(lr), float(momentum)

    def init_state(self, params: Tensors) -> dict[str, torch.Tensor]:
        state = {STEP: torch.zeros((), dtype=torch.int64)}
        for name, p in params.items():
            state[f"momentum/{name}"] = torch.zeros_like(p, dtype=torch.float32, device="cpu")
        return state

    def step(self, params: Tensors, grads: Tensors, state: State) -> None:
        _check(params, grads)
        first = int(state[STEP]) == 0
        for name in sorted(params):
            g, buf = grads[name], state[f"momentum/{name}"]
            # Same ops, same order as torch.optim.sgd._single_tensor_sgd.
            if first:
                buf.copy_(g)
            else:
                buf.mul_(self.momentum).add_(g, alpha=1.0)
            d = g.add(buf, alpha=self.momentum)
            params[name].add_(d, alpha=-self.lr)
        state[STEP].add_(1)

    def __repr__(self) -> str:
        return f"Nesterov(lr={self.lr}, momentum={self.momentum})"


class HeavyBall:
    """Heavy-ball momentum as the NoLoCo repo's "Nesterov" really is:

        m = μ·m − η·Δ ;  θ = θ + m

    (zero-initialised m; not PyTorch's Nesterov: there is no look-ahead, and
    the first step is −η·Δ, not −η·(1+μ)·Δ). State: `step`, `momentum/<name>`."""

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = float(lr), float(momentum)

    def init_state(self, params: Tensors) -> dict[str, torch.Tensor]:
        state = {STEP: torch.zeros((), dtype=torch.int64)}
        for name, p in params.items():
            state[f"momentum/{name}"] = torch.zeros_like(p, dtype=torch.float32, device="cpu")
        return state

    def step(self, params: Tensors, grads: Tensors, state: State) -> None:
        _check(params, grads)
        for name in sorted(params):
            m = state[f"momentum/{name}"]
            m.mul_(self.momentum).add_(grads[name], alpha=-self.lr)
            params[name].add_(m)
        state[STEP].add_(1)

    def __repr__(self) -> str:
        return f"HeavyBall(lr={self.lr}, momentum={self.momentum})"


OuterOptimizer = SGD | Nesterov | HeavyBall


def sub_state(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a SharedState's tensors under `prefix`, with the prefix
    stripped: views of the live tensors, so an optimizer step on them updates
    the shared state in place."""
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}


__all__ = ["SGD", "HeavyBall", "Nesterov", "OuterOptimizer", "STEP", "sub_state"]
