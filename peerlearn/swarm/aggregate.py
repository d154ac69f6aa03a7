"""Aggregation rules for a round's contributions: the mean, and rules that a
few dishonest members cannot steer (`--aggregate`).

The plain mean is computed by the ring all-reduce (allreduce.py): nobody
sees a single contribution, and one member's 1e30 or sign flip moves the
result as far as it likes. A robust rule needs every contribution, so with
one the round all-gathers them (allgather.py) and each participant applies
the rule to the same rows in the same order.

Byte-identical everywhere: the swarm's parity check compares state hashes,
so every honest participant must compute the same bits. Each rule here is
built only from operations whose result does not depend on the CPU, the
thread count or the SIMD width: element-wise IEEE arithmetic (add, multiply,
divide: correctly rounded, so vectorised and scalar code agree), sorting
along the peer axis (exact selection), and Python float arithmetic on
scalars. The one reduction over the model's elements, the distance
||x_i - v|| of CenteredClip, is summed in float64 over a fixed pairwise tree
of element-wise adds (`fixed_order_norm`), never by torch's reductions,
whose association order depends on threads and vector width. A participant
that still computes other bits reports another result hash, and the round
aborts (coordinating.py): a divergence is never applied.

The rules (rows: the n finite contributions, in participant order; a row
with a NaN or an infinity is left out first, and its sender reported):
  * centered-clip (recommended): CenteredClip, Karimireddy, He & Jaggi,
    "Learning from History for Byzantine Robust Optimization" (ICML 2021),
    the rule BTARD (Gorbunov et al. 2022) runs inside its all-reduce:
        v_0 = coordinate-wise median of the rows
        for l in 0 .. ITERATIONS-1:
            tau_l = median_i ||x_i - v_l||
            v_{l+1} = v_l + 1/n * sum_i (x_i - v_l) * min(1, tau_l / ||x_i - v_l||)
    With f < n/2 dishonest rows, tau_l is at most the largest honest
    distance, so each dishonest row moves v by at most tau_l / n per
    iteration however large it is, while honest rows inside the radius count
    fully (unlike the median, which throws their information away).
  * trimmed-mean: per coordinate, drop the `trim(n)` smallest and largest
    values and average the rest (Yin et al., ICML 2018).
  * median: the coordinate-wise median (the mean of the two middle values
    for an even count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RULES = ("mean", "centered-clip", "trimmed-mean", "median")
ROBUST_RULES = RULES[1:]
ITERATIONS = 3  # CenteredClip's fixed-point steps: fixed, so every peer runs the same


@dataclass(frozen=True)
class Aggregated:
    """A rule's result (a new tensor the caller owns) and the participants
    whose rows were left out for not being finite (their indices)."""

    value: torch.Tensor
    refused: tuple[int, ...]


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}: one of {', '.join(RULES)}")
    return rule


def trim(n: int) -> int:
    """How many values trimmed-mean drops at each end: f with n >= 3f + 1
    (the usual bound for f dishonest of n), at least 1 from three rows on."""
    return max(1 if n >= 3 else 0, (n - 1) // 3)


def aggregate(rows: torch.Tensor, rule: str) -> Aggregated:
    """rows: (n, numel) fp32 CPU, one contribution a row, in the same order at
    every peer (only read). Returns the rule's value over the finite rows; if
    no row is finite, a NaN tensor (the caller's finiteness check fails the
    round). Deterministic: the same rows give the same bits on any machine."""
    check_rule(rule)
    if rows.dim() != 2 or rows.dtype != torch.float32:
        raise ValueError("rows must be a 2-D fp32 tensor")
    finite = [bool(torch.isfinite(rows[i]).all()) for i in range(rows.shape[0])]
    refused = tuple(i for i, ok in enumerate(finite) if not ok)
    if not any(finite):
        return Aggregated(torch.full((rows.shape[1],), math.nan), refused)
    good = rows if not refused else rows[[i for i, ok in enumerate(finite) if ok]]
    if rule == "mean":
        value = ordered_sum(good).div_(good.shape[0])
    elif rule == "median":
        value = coordinate_median(good)
    elif rule == "trimmed-mean":
        value = trimmed_mean(good, trim(good.shape[0]))
    else:
        value = centered_clip(good)
    return Aggregated(value, refused)


def ordered_sum(rows: torch.Tensor) -> torch.Tensor:
    """Row 0 + row 1 + ... in that order, element-wise (a new tensor)."""
    acc = rows[0].clone()
    for i in range(1, rows.shape[0]):
        acc.add_(rows[i])
    return acc


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    n = rows.shape[0]
    ranked = torch.sort(rows, dim=0).values
    if n % 2:
        return ranked[n // 2].clone()
    return (ranked[n // 2 - 1] + ranked[n // 2]).mul_(0.5)


def trimmed_mean(rows: torch.Tensor, f: int) -> torch.Tensor:
    n = rows.shape[0]
    if n - 2 * f < 1:
        raise ValueError(f"cannot trim {f} from each end of {n} rows")
    if f == 0:
        return ordered_sum(rows).div_(n)
    ranked = torch.sort(rows, dim=0).values
    return ordered_sum(ranked[f:n - f]).div_(n - 2 * f)


def centered_clip(rows: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """CenteredClip from the coordinate-wise median, radius the median
    distance (see the module docstring). A new tensor."""
    n = rows.shape[0]
    v = coordinate_median(rows)
    for _ in range(iterations):
        diffs = [rows[i] - v for i in range(n)]
        norms = [fixed_order_norm(d) for d in diffs]
        tau = _median(norms)
        step = torch.zeros_like(v)
        for d, norm in zip(diffs, norms):
            if norm > tau:  # also keeps norm > 0 for the division
                d.mul_(tau / norm)
            step.add_(d)
        v.add_(step.div_(n))
    return v


def fixed_order_norm(x: torch.Tensor) -> float:
    """||x||_2 of a 1-D tensor, summed in float64 over a fixed pairwise tree
    of element-wise adds: the same bits on every machine, unlike
    torch.linalg.vector_norm, whose order follows threads and SIMD width."""
    n = x.numel()
    if n == 0:
        return 0.0
    size = 1 << (n - 1).bit_length()
    acc = torch.zeros(size, dtype=torch.float64)
    acc[:n] = x
    acc.mul_(acc)
    while size > 1:
        size //= 2
        acc = acc[:size] + acc[size:2 * size]
    return math.sqrt(float(acc[0]))


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
