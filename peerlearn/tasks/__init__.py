"""Training tasks: what a swarm trains, separate from how peers train together.

A task is a `Task` value (model, inner optimizer, data, loss, evaluation);
`load(spec, **overrides)` builds one from a spec such as "bytelm" (the
built-in byte-level GPT, `peerlearn/tasks/bytelm.py`, the example to copy) or
"path/to/mytask.py:task". See `base.Task` for the invariants a task keeps.
"""

from peerlearn.tasks.base import Task, TaskError, adamw, warmup_cosine
from peerlearn.tasks.loader import load

__all__ = ["Task", "TaskError", "adamw", "load", "warmup_cosine"]
