"""Training metrics, and the metrics a user's own loop adds: served by the
peer's metrics endpoint (`peerlearn run --metrics`) beside the daemon's.

Process-wide, as a peer is one per process. A training loop reports what it
did with `record_training`; `peerlearn.algorithms.training.train` does so
every step. Another loop adds its own figures with `gauge`, `counter` and
`histogram` (prometheus_client objects, thread-safe, set from any thread):

    from peerlearn import telemetry

    grad_norm = telemetry.gauge("myrun_grad_norm", "L2 norm of the last gradient.")
    ...
    telemetry.record_training(inner_step=step, loss=loss, tokens=tokens_in_batch,
                              learning_rates={"inner": lr})
    grad_norm.set(norm)

Names starting with `peerlearn_` are peerlearn's own and refused here.
"""

from __future__ import annotations

import math
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

# What the endpoint serves besides the daemon's metrics: the training figures
# and whatever a user's loop registered.
REGISTRY = CollectorRegistry(auto_describe=True)

# Learning-rate labels are a fixed, small set (a label per optimizer, not per
# parameter group): a loop passing anything else is a bug worth hearing of.
LR_KINDS = ("inner", "outer")


def _own_name(name: str) -> str:
    if name.startswith("peerlearn_"):
        raise ValueError(f"{name!r}: names starting with peerlearn_ are peerlearn's own")
    return name


def gauge(name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Gauge:
    """A gauge served on the peer's metrics endpoint."""
    return Gauge(_own_name(name), documentation, labelnames, registry=REGISTRY)


def counter(name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Counter:
    """A counter served on the peer's metrics endpoint (name it without `_total`)."""
    return Counter(_own_name(name), documentation, labelnames, registry=REGISTRY)


def histogram(name: str, documentation: str, labelnames: tuple[str, ...] = (),
              buckets: tuple[float, ...] = Histogram.DEFAULT_BUCKETS) -> Histogram:
    """A histogram served on the peer's metrics endpoint."""
    return Histogram(_own_name(name), documentation, labelnames, buckets=buckets,
                     registry=REGISTRY)


class _Training:
    """The training figures of this process's loop. Nothing is served before
    the loop reports (a peer that only serves the swarm shows no loss of 0)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._algo: str | None = None
        self._task: str | None = None
        self._inner: int | None = None
        self._outer: int | None = None
        self._loss: float | None = None
        self._tokens = 0
        self._tokens_per_s: float | None = None
        self._lrs: dict[str, float] = {}
        self._window: tuple[float, int] | None = None  # (monotonic, tokens) at window start

    def record(self, *, algo: str | None = None, task: str | None = None,
               inner_step: int | None = None, outer_step: int | None = None,
               loss: float | None = None, tokens: int = 0,
               learning_rates: dict[str, float] | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            if self._window is None:
                self._window = (now, self._tokens)
            self._tokens += tokens
            # tokens/s over windows of at least 5 s: one step's rate is noise.
            t0, n0 = self._window
            if now - t0 >= 5.0:
                self._tokens_per_s = (self._tokens - n0) / (now - t0)
                self._window = (now, self._tokens)
            elif self._tokens_per_s is None and now > t0:
                # Until the first full window: the rate so far, so a scrape of
                # a young (or fast-finishing) run still shows one.
                self._tokens_per_s = (self._tokens - n0) / (now - t0)
            if algo is not None:
                self._algo = algo
            if task is not None:
                self._task = task
            if inner_step is not None:
                self._inner = inner_step
            if outer_step is not None:
                self._outer = outer_step
            if loss is not None and math.isfinite(loss):
                self._loss = float(loss)
            for kind, lr in (learning_rates or {}).items():
                if kind not in LR_KINDS:
                    raise ValueError(f"learning rate kind {kind!r}: one of {LR_KINDS}")
                self._lrs[kind] = float(lr)

    def collect(self):
        with self._lock:
            if self._inner is None and self._loss is None and not self._tokens:
                return
            if self._algo or self._task:
                yield InfoMetricFamily("peerlearn_train", "What this peer trains.",
                                       value={"algo": self._algo or "", "task": self._task or ""})
            yield CounterMetricFamily("peerlearn_train_tokens",
                                      "Tokens this peer trained on.", value=self._tokens)
            for name, doc, value in (
                    ("peerlearn_train_inner_step", "Inner (local) steps this peer took.",
                     self._inner),
                    ("peerlearn_train_outer_step",
                     "Outer steps (synchronisations) this peer's algorithm applied.", self._outer),
                    ("peerlearn_train_loss",
                     "Mean training loss over the last progress window.", self._loss),
                    ("peerlearn_train_tokens_per_second",
                     "Tokens per second over the last 5 s or more.", self._tokens_per_s)):
                if value is not None:
                    yield GaugeMetricFamily(name, doc, value=value)
            if self._lrs:
                lr = GaugeMetricFamily("peerlearn_train_learning_rate",
                                       "Learning rate now, by optimizer (inner, outer).",
                                       labels=["optimizer"])
                for kind, value in sorted(self._lrs.items()):
                    lr.add_metric([kind], value)
                yield lr


_TRAINING = _Training()
REGISTRY.register(_TRAINING)


def record_training(*, algo: str | None = None, task: str | None = None,
                    inner_step: int | None = None, outer_step: int | None = None,
                    loss: float | None = None, tokens: int = 0,
                    learning_rates: dict[str, float] | None = None) -> None:
    """Report training progress (thread-safe; call as often as every step).
    `tokens` is added to the running total; the others replace what was there.
    `learning_rates` maps "inner" and/or "outer" to their value now."""
    _TRAINING.record(algo=algo, task=task, inner_step=inner_step, outer_step=outer_step,
                     loss=loss, tokens=tokens, learning_rates=learning_rates)
