"""The demo's warm start: one process trains the task alone on the whole
corpus for a few hundred steps, and every peer of the demo (and its
single-peer reference) starts from the result.

Why: DiLoCo is made to continue a pretrained model (the paper starts after
24k steps). From random weights a short run takes a handful of outer steps
during the first steep descent and ends barely better than one peer alone;
from a warm start the same run ends well below it (docs/algorithms.md,
"Experiments from a warm start" and "The demo's warm start").

The procedure is cmd/train_experiments.py's `pretrain`: the task's own
inner optimizer and schedule over `steps`, data shard 0/1 in the order of
seed + 1000 (another order than the peers' shards: the same corpus, as a
pretraining and a fine-tuning phase of one run would see it). The result is
a `state_dict` saved with torch.save, which the task loads through its
`init` setting (weights only, checked against the model). It is cached,
keyed by everything it depends on (task, settings, seed, steps, corpus,
torch), so only the first demo of a setting pays for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "PEERLEARN_CACHE_DIR"
# Bumped when the procedure changes, so no file of an older one is reused.
VERSION = 1


def cache_dir() -> Path:
    """$PEERLEARN_CACHE_DIR, else $XDG_CACHE_HOME/peerlearn, else ~/.cache/peerlearn."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peerlearn"


def _threads() -> int:
    """Threads for the warm-up: the cores other work leaves idle (1 to 4). On a
    busy 2-core machine 2 threads ran a step 2 to 3 times slower than 1
    (0.5-0.8 s against 1.0-2.7 s, load average 8); on an idle one 2 are faster."""
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(4, cores - busy))


def supported(task_spec: str | None, task_args: dict) -> str | None:
    """None when the task can start from a warm-up, else why not (one phrase)."""
    if "init" in task_args:
        return "the task's init is given (--set init=...)"
    if task_spec is not None:
        from peerlearn.tasks import load

        if "init" not in load(task_spec, **task_args).config:
            return f"task {task_spec} has no init setting to start from"
    return None


def warm_start(task_spec: str | None, task_args: dict, *, seed: int, steps: int,
               say: Callable[[str], None], directory: Path | None = None) -> tuple[Path, dict]:
    """The path of the warm-up's state_dict for (task, settings, seed, steps),
    trained now unless cached; and what happened ({"steps", "cached",
    "seconds", "val_loss" (of the warm model, when trained now), "file"}).
    `say` gets progress lines."""
    import torch

    from peerlearn.tasks import load

    task = load(task_spec, **task_args)
    key = json.dumps({"v": VERSION, "task": task_spec or "bytelm", "name": task.name,
                      "config": dict(task.config), "seed": seed, "steps": steps,
                      "fingerprint": task.fingerprint, "torch": torch.__version__},
                     sort_keys=True, default=str)
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    path = (directory or cache_dir()) / "warm" / f"{task.name}-seed{seed}-{steps}-{digest}.pt"
    if path.exists():
        return path, {"steps": steps, "cached": True, "seconds": 0.0, "file": str(path)}
    say(f"warm-up: one process trains {task.name} alone for {steps} steps on the whole "
        f"corpus, then every peer starts from it (cached in {path.parent} for the next demo)")
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads())
    try:
        model = task.model
        opt = task.inner_optimizer(model.parameters())
        sched = task.schedule(opt, steps) if task.schedule is not None else None
        batches = task.batches(0, 1, seed + 1000)
        t0 = time.monotonic()
        every = max(1, steps // 5)
        for step in range(1, steps + 1):
            loss = task.loss(model, next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if step == min(10, every) or step % every == 0 or step == steps:
                took = time.monotonic() - t0
                left = f", about {took / step * (steps - step):.0f} s left" if step < steps else ""
                say(f"warm-up step {step}/{steps} loss {loss.item():.4f} {took:.0f} s{left}")
        seconds = time.monotonic() - t0
        val = task.evaluate(model, 20)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent demo reads the whole file or none
    return path, {"steps": steps, "cached": False, "seconds": round(seconds, 1),
                  "val_loss": val, "file": str(path)}


__all__ = ["CACHE_ENV", "cache_dir", "supported", "warm_start"]
