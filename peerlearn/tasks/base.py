"""What a task is: the model, its data and its inner optimizer, as plain values.

A trainer needs nothing else to run DiLoCo-style inner steps on one peer:

    task = load("bytelm")
    opt = task.inner_optimizer(task.model.parameters())
    for batch in task.batches(rank, world, seed):
        loss = task.loss(task.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

The runtime moves parameters between peers; a task never talks to the network.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch


class TaskError(PeerlearnError, ValueError):
    """A task could not be loaded or configured. The message is one line, fit to
    print without a traceback (the CLI does exactly that)."""


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity, a Module has no value equality
class Task:
    """One training task, as every peer of a swarm builds it.

    Invariants a task must keep (the runtime relies on them; the built-in
    `peerlearn.tasks.bytelm` shows one way):

    - `model` holds the initial parameters, a pure function of the task's seed
      and settings: every peer that builds the task with the same seed holds the
      same bytes, so the swarm can start from one state without a transfer.
    - `batches(rank, world, seed)` is endless and deterministic: the same
      (rank, world, seed) always yields the same sequence, and peers
      0..world-1 of one world draw from disjoint shards of the training split.
    - `evaluate(model, max_batches)` reads only the held-out split, always the
      same batches in the same order, whichever peer calls it; it leaves the
      model's train/eval mode as it found it and returns the mean loss.
    - `loss(model, batch)` returns a scalar tensor with a graph to backprop.
    - `tokens_per_batch` counts the tokens (or samples) one batch trains on.
    """

    name: str
    model: torch.nn.Module
    inner_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    batches: Callable[[int, int, int], Iterator[Any]]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    evaluate: Callable[[torch.nn.Module, int], float]
    tokens_per_batch: int
    # Identifies the data: peers whose fingerprints differ train on different
    # corpora and should not be in one swarm. "" when the task has no such notion.
    fingerprint: str = ""
    # The settings the task was built with (after overrides), for logs and status.
    config: Mapping[str, Any] = field(default_factory=dict)
    # (inner optimizer, total inner steps) -> an LR scheduler the trainer steps
    # once per inner step; None: a constant lr.
    schedule: Callable[[torch.optim.Optimizer, int], Any] | None = None

    def __post_init__(self) -> None:
        # Freeze the settings too, so a Task is a value a trainer can share.
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        if self.tokens_per_batch <= 0:
            raise TaskError(f"task {self.name!r}: tokens_per_batch must be positive")


def adamw(params: Iterable[torch.nn.Parameter], lr: float = 4e-4, weight_decay: float = 0.1,
          betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """The DiLoCo inner optimizer: AdamW, betas (0.9, 0.95), weight decay 0.1.

    Decay applies to matrices and embeddings only; biases and norm gains (1-D)
    are left alone, as in GPT-2/nanoGPT, because shrinking them toward zero
    only fights the normalisation.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the optimizer's lr over `warmup_steps`, then a cosine
    decay to `min_ratio` of it at `total_steps`, flat after that.

    Call `.step()` once per inner step, after `optimizer.step()`. The factor is a
    pure function of the step count, so a peer that restores the count (from a
    checkpoint or the swarm's step) resumes on the same schedule.
    """
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError("need 0 <= warmup_steps < total_steps")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
