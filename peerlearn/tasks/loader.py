"""`load(spec, **overrides)`: turn a task spec from the command line into a Task.

Specs:
    None or "bytelm"          the built-in task, peerlearn.tasks.bytelm:task
    "package.module:function" an importable module
    "path/to/file.py:function" a file, imported under a private module name

Every failure to find or build the task raises TaskError with a one-line
message. Exceptions raised inside the task function itself propagate
unchanged: they are bugs in the task, and their traceback is the useful part.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from types import ModuleType

from peerlearn.tasks.base import Task, TaskError

BUILTIN = "peerlearn.tasks.bytelm:task"


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise TaskError(f"task file {path!r} does not exist")
    full = os.path.abspath(path)
    # A name private to this file, so two task files both called task.py (or one
    # shadowing a real package) never collide in sys.modules.
    tag = hashlib.blake2b(full.encode(), digest_size=6).hexdigest()
    name = f"_peerlearn_task_{tag}"
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {path!r} cannot be imported (not a Python source file?)")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and pickling look the module up by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise TaskError(f"importing task file {path!r} failed: {_one_line(e)}") from e
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Only "no such module" when it is the module asked for (or a parent
        # package) that is missing, not something that module imports.
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise TaskError(f"no task module named {name!r}") from e
        raise TaskError(f"importing task module {name!r} failed: {_one_line(e)}") from e
    except Exception as e:
        raise TaskError(f"importing task module {name!r} failed: {_one_line(e)}") from e


def load(spec: str | None = None, **overrides) -> Task:
    """Build the task named by `spec`, passing `overrides` as keyword arguments
    to its function. Raises TaskError (one-line message) when the module or
    function is missing, rejects the overrides, or returns something other
    than a Task."""
    if spec is None or spec == "bytelm":
        spec = BUILTIN
    module_name, sep, func_name = spec.rpartition(":")  # rpartition: "C:\\x.py:task" works
    if not sep or not module_name or not func_name:
        raise TaskError(f"task spec {spec!r} is not 'bytelm', 'module:function' "
                        f"or 'path/to/file.py:function'")
    is_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    module = _import_file(module_name) if is_file else _import_module(module_name)

    fn = getattr(module, func_name, None)
    if fn is None:
        raise TaskError(f"task module {module_name!r} has no function {func_name!r}")
    if not callable(fn):
        raise TaskError(f"{spec!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(**overrides)
    except TypeError as e:
        raise TaskError(f"{spec!r} does not accept these settings: {_one_line(e)}") from e
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    made = fn(**overrides)
    if not isinstance(made, Task):
        raise TaskError(f"{spec!r} returned a {type(made).__name__}, not a peerlearn.tasks.Task")
    return made
