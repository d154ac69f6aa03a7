"""One peer's own training progress across a restart: the inner optimizer,
the learning-rate schedule's position and the data position.

The swarm heals the shared state of a restarted peer (a joiner syncs it), as
torchft heals a replica from a donor; what only this peer holds is its inner
optimizer (AdamW's moments), where its schedule stands and how far it read its
data stream. Without them a restarted peer started AdamW from zero, warmed up
again and re-read its data from the start. They are written to the data dir
(`train-local.ckpt`, the checkpoint format: tensors plus a JSON description,
no pickle, atomic) after every outer step and when the run stops, and read
back when the same run (same task, algorithm, settings, steps and data
stream) starts again in that data dir. Anything else is refused with the
reason logged, never fatal: the run then starts its own progress afresh.

Local progress made since the last outer step (at most H inner steps) is not
kept: the model takes the swarm's agreed parameters on restart, as any joiner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from peerlearn.state import checkpoint
from peerlearn.state.shared import DTYPE_NAMES, SharedState

log = logging.getLogger(__name__)

PROGRESS_FILE = "train-local.ckpt"
_RUN = "progress/run"  # canonical JSON of the run's identity
_META = "progress/meta"  # JSON: counters, optimizer groups, scheduler state
_OPT = "progress/opt/"  # + "<param index>/<key>": the optimizer's per-parameter tensors
MAX_META_BYTES = 1 << 20


def _json_tensor(obj) -> torch.Tensor:
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def _tensor_json(t: torch.Tensor):
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > MAX_META_BYTES:
        raise ValueError("a JSON field is malformed")
    return json.loads(bytes(t.tolist()))


def save(path: Path, run: Mapping[str, object], *, step: int, tokens: int,
         optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    """Writes this peer's progress atomically (the old file or the new one,
    never a torn one). Raises ValueError for optimizer state it cannot keep."""
    sd = optimizer.state_dict()
    own = SharedState(step)
    own.register(_RUN, _json_tensor(dict(run)))
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.dtype not in DTYPE_NAMES:
                raise ValueError(f"optimizer state {key!r} of type {type(value).__name__} "
                                 "cannot be kept")
            own.register(f"{_OPT}{idx}/{key}", value.detach().to("cpu").clone())
    meta = {"step": step, "tokens": tokens, "param_groups": sd["param_groups"],
            "scheduler": scheduler.state_dict() if scheduler is not None else None}
    own.register(_META, _json_tensor(meta))
    checkpoint.save(own, path)


def load(path: Path, run: Mapping[str, object], *, optimizer: torch.optim.Optimizer,
         scheduler=None) -> tuple[int, int] | None:
    """Puts this peer's saved progress back into optimizer and scheduler and
    returns (step, tokens); None (with the reason logged) when there is none
    for this run. On refusal the optimizer and scheduler are left untouched."""
    if not path.exists():
        return None
    try:
        own = checkpoint.load(path).tensors
        if _tensor_json(own[_RUN]) != json.loads(json.dumps(dict(run))):
            raise ValueError("it is of another run (task, algorithm, settings, steps or data "
                             "stream differ)")
        meta = _tensor_json(own[_META])
        step, tokens = meta["step"], meta["tokens"]
        if not (isinstance(step, int) and isinstance(tokens, int) and 0 <= step
                and 0 <= tokens):
            raise ValueError("its counters are out of range")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in own.items():
            if name.startswith(_OPT):
                idx, key = name[len(_OPT):].split("/", 1)
                state.setdefault(int(idx), {})[key] = t
        before = optimizer.state_dict()
        groups = meta["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(before["param_groups"]):
            raise ValueError("it has another number of parameter groups")
        for saved_group, group in zip(groups, before["param_groups"]):
            for k, v in group.items():  # JSON made tuples (AdamW's betas) lists
                if isinstance(v, tuple) and isinstance(saved_group.get(k), list):
                    saved_group[k] = tuple(saved_group[k])
        saved = {"state": state, "param_groups": groups}
        optimizer.load_state_dict(saved)  # checks groups and parameter counts
        if (scheduler is None) != (meta["scheduler"] is None):
            optimizer.load_state_dict(before)
            raise ValueError("it was written with another learning-rate schedule")
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
    except (checkpoint.CheckpointError, OSError, KeyError, ValueError, TypeError) as e:
        log.warning("not resuming training progress from %s: %s", path, e)
        return None
    log.info("resumed training progress from %s: inner step %d (optimizer, schedule and data "
             "position)", path, step)
    return step, tokens
