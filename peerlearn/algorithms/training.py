"""One peer's training run: a task, an algorithm, a swarm `Peer`.

This is the loop a user would write (and `peerlearn run --algo` runs):

    for step in range(steps):
        loss = task.loss(model, next(batches)); loss.backward()
        optimizer.step(); algorithm.step()        # the algorithm decides when to sync

and what it measures: tokens, seconds spent computing (forward, backward,
inner step) against wall time, bytes on the wire as the transport counted
them, and the validation loss of the parameters the swarm agreed on (the
outer parameters for the DiLoCo family: the paper evaluates those; each
peer's own parameters for gossip runs, which are the merged ones after a
final merge).

Every peer of a run must build the task with the same seed and settings and
use the same algorithm settings (`Hyper`): the founder's initial state comes
from them and every apply runs with them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from peerlearn import telemetry
from peerlearn.algorithms import progress as own_progress
from peerlearn.algorithms.async_diloco import AsyncDiLoCo, EagerDiLoCo
from peerlearn.algorithms.ddp import DDP
from peerlearn.algorithms.decentral import LOCAL_FILE, GossipLoop, derive_seed
from peerlearn.algorithms.diloco import OUTER, DiLoCo
from peerlearn.algorithms.gossip import GossipAveraging
from peerlearn.algorithms.noloco import NoLoCo
from peerlearn.swarm.gossip import GROUPINGS
from peerlearn.algorithms.outer import Nesterov
from peerlearn.algorithms.streaming import StreamingDiLoCo, check_schedule
from peerlearn.state.shared import SharedState
from peerlearn.swarm.errors import CollectiveTimeout
from peerlearn.transport.traffic import CONTROL, WIRE

ALGORITHMS = ("diloco", "streaming", "async", "eager", "ddp", "local", "noloco", "gossip",
              "gossip-vc")
GOSSIP_ALGORITHMS = ("noloco", "gossip", "gossip-vc")  # no global collective
# Algorithms whose peers keep their own progress across a restart (progress.py):
# the model comes back from the swarm's state (or the gossip checkpoint), so
# the inner optimizer, schedule and data position are what a restart would lose.
log = logging.getLogger(__name__)
RESUMABLE = ("diloco", "streaming", "async", "eager", *GOSSIP_ALGORITHMS)


class Local:
    """No communication: each peer trains alone on its shard. The baseline a
    run's compute utilisation and loss are compared against (a single peer,
    or N peers that never talk)."""

    def step(self) -> None:
        pass

    def metrics(self) -> dict[str, int]:
        return {}


@dataclass(frozen=True)
class Hyper:
    """Algorithm settings; equal at every peer of a run."""

    H: int = 50  # inner steps per outer step
    outer_lr: float = 0.7
    momentum: float = 0.9
    P: int = 4  # streaming: fragments
    tau: int = 1  # streaming: inner steps a fragment's reduction overlaps
    alpha: float = 0.5  # streaming: local weight when merging
    weighted: bool = False  # diloco: weight pseudo-gradients by tokens
    # diloco: an outer step every this many seconds of training instead of
    # every H inner steps (each peer runs as many as fit; weighted by tokens)
    outer_every_s: float | None = None
    timeout: float | None = 120.0  # an outer step waits this long, then is skipped
    # Gossip runs (noloco, gossip, gossip-vc):
    group: int = 2  # peers per gossip group
    noloco_momentum: float = 0.5  # NoLoCo's α (its β is outer_lr)
    noloco_nesterov: bool = False  # NoLoCo's momentum: heavy-ball (the authors' code) or Nesterov
    gamma: float = 0.7  # NoLoCo's pull toward the group's mean
    merge_at: int = 0  # one agreed all-reduce of the params: 0 never, -1 at the end, N after step N
    independent_init: bool = False  # each peer starts from its own initialisation
    gossip_timeout: float = 30.0  # an exchange waits this long for its group, then is skipped
    gossip_seed: int = 0  # the pairing's seed (the same at every peer)
    # How gossip groups are drawn: "random" (a new random partition every
    # round, as NoLoCo's code) or "grid" (Moshpit SGD's: exact mean in
    # ceil(log_group N) rounds on a full grid; swarm/gossip.grid_groups).
    grouping: str = "random"

    def check(self, algo: str) -> None:
        """Raises ValueError (one line) for settings `algo` cannot run with,
        before a peer starts rather than after it joined."""
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algo!r}: one of {', '.join(ALGORITHMS)}")
        if self.H < 1:
            raise ValueError(f"--H must be at least 1, not {self.H}")
        if algo in GOSSIP_ALGORITHMS:
            if self.group < 2:
                raise ValueError(f"--group must be at least 2, not {self.group}")
            if self.grouping not in GROUPINGS:
                raise ValueError(f"--grouping must be one of {', '.join(GROUPINGS)}, "
                                 f"not {self.grouping!r}")
            if self.merge_at < -1:
                raise ValueError("--merge-at: off, end or an inner step")
            if not self.gossip_timeout > 0:
                raise ValueError("--gossip-timeout must be positive")
        elif self.merge_at or self.independent_init:
            raise ValueError("--merge-at and --independent-init apply to "
                             f"{', '.join(GOSSIP_ALGORITHMS)} only")
        if algo == "streaming":
            check_schedule(self.H, self.P, self.tau, self.alpha)
        if self.outer_every_s is not None:
            if algo != "diloco":
                raise ValueError("--outer-every-s applies to diloco only")
            if not self.outer_every_s > 0:
                raise ValueError(f"--outer-every-s must be positive, not {self.outer_every_s}")


def initial_state(algo: str, model: nn.Module, hp: Hyper) -> SharedState:
    """What a founder's swarm starts from for `algo` (the model's initial params)."""
    outer = Nesterov(hp.outer_lr, hp.momentum)
    if algo in ("diloco", "async", "eager"):
        return DiLoCo.initial_state(model, outer)
    if algo == "streaming":
        return StreamingDiLoCo.initial_state(model, hp.P, outer)
    if algo in ("ddp", "local"):
        return SharedState()  # nothing agreed but the step
    if algo in GOSSIP_ALGORITHMS:
        return GossipLoop.initial_state(model, gossip_config(algo, hp))
    raise ValueError(f"unknown algorithm {algo!r}: one of {', '.join(ALGORITHMS)}")


def gossip_config(algo: str, hp: Hyper) -> dict:
    """What the peers of a gossip run must agree on (the shared `gossip/config`)."""
    cfg = {"algo": algo, "H": hp.H, "group": hp.group, "merge_at": hp.merge_at,
           "independent_init": hp.independent_init, "gossip_seed": hp.gossip_seed}
    if hp.grouping != "random":  # absent when random: the configuration of earlier runs stands
        cfg["grouping"] = hp.grouping
    if algo == "noloco":
        cfg.update(outer_lr=hp.outer_lr, momentum=hp.noloco_momentum, gamma=hp.gamma)
        if hp.noloco_nesterov:  # absent when off: the configuration of earlier runs stands
            cfg["nesterov"] = True
    return cfg


def local_checkpoint_path(peer) -> Path | None:
    """Where a gossip run keeps this peer's own progress: its data dir."""
    data_dir = getattr(getattr(peer, "cfg", None), "data_dir", None)
    return None if data_dir is None else Path(data_dir) / LOCAL_FILE


def make(algo: str, peer, model: nn.Module, optimizer, hp: Hyper, *, rank: int = 0):
    """The algorithm object for one peer; `rank` (its shard) seeds an
    independent initialisation."""
    outer = Nesterov(hp.outer_lr, hp.momentum)
    if algo in GOSSIP_ALGORITHMS:
        kw = dict(H=hp.H, config=gossip_config(algo, hp), group=hp.group, seed=hp.gossip_seed,
                  merge_at=hp.merge_at, grouping=hp.grouping, timeout=hp.timeout,
                  gossip_timeout=hp.gossip_timeout,
                  init_seed=derive_seed("init", hp.gossip_seed, rank)
                  if hp.independent_init else None,
                  local_path=local_checkpoint_path(peer))
        if algo == "noloco":
            return NoLoCo(peer, model, optimizer, outer_lr=hp.outer_lr,
                          momentum=hp.noloco_momentum, gamma=hp.gamma,
                          nesterov=hp.noloco_nesterov, **kw)
        return GossipAveraging(peer, model, optimizer, vc=algo == "gossip-vc", **kw)
    if algo == "diloco":
        return DiLoCo(peer, model, optimizer, H=hp.H, outer=outer, weighted=hp.weighted,
                      timeout=hp.timeout, every_s=hp.outer_every_s)
    if algo == "streaming":
        return StreamingDiLoCo(peer, model, optimizer, H=hp.H, P=hp.P, tau=hp.tau,
                               alpha=hp.alpha, outer=outer, timeout=hp.timeout)
    if algo == "async":
        return AsyncDiLoCo(peer, model, optimizer, H=hp.H, outer=outer, timeout=hp.timeout)
    if algo == "eager":
        return EagerDiLoCo(peer, model, optimizer, H=hp.H, outer=outer, timeout=hp.timeout)
    if algo == "ddp":
        return DDP(peer, model, timeout=hp.timeout)
    if algo == "local":
        return Local()
    raise ValueError(f"unknown algorithm {algo!r}: one of {', '.join(ALGORITHMS)}")


def agreed_model(model: nn.Module, state: SharedState | None) -> nn.Module:
    """The model with the swarm's agreed (outer) parameters, if the state has
    them; else the model itself (DDP: every replica holds the same params)."""
    if state is None or not any(k.startswith(OUTER) for k in state.tensors):
        return model
    agreed = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in agreed.named_parameters():
            p.copy_(state.tensors[OUTER + name].to(p.device, p.dtype))
    return agreed


# How a report groups the traffic classes bytes are counted under
# (transport.traffic): the algorithm's own exchanges (all-reduce rounds and
# gossip, with the greetings that open data links: "other"), state transfers
# (served and fetched) and control messages.
_KIND_OF = {"round": "collective", "gossip": "collective", "other": "collective",
            "state": "state", CONTROL: "control"}


def traffic_bytes() -> dict[tuple[str, str], int]:
    """Bytes this process moved so far, by (direction, kind)."""
    out = {(d, k): 0 for d in ("sent", "received") for k in ("collective", "state", "control")}
    for (direction, traffic), n in WIRE.snapshot().items():
        out[direction, _KIND_OF.get(traffic, "collective")] += n
    return out


def bytes_report(since: dict[tuple[str, str], int]) -> dict[str, int]:
    """The report's byte figures, moved since `since` (traffic_bytes() then):
    each kind, then the total."""
    now = traffic_bytes()
    moved = {key: now[key] - since[key] for key in now}
    return {
        "bytes_sent_collective": moved["sent", "collective"],
        "bytes_sent_state": moved["sent", "state"],
        "bytes_sent_control": moved["sent", "control"],
        "bytes_sent": sum(n for (d, _), n in moved.items() if d == "sent"),
        "bytes_received_collective": moved["received", "collective"],
        "bytes_received_state": moved["received", "state"],
        "bytes_received_control": moved["received", "control"],
        "bytes_received": sum(n for (d, _), n in moved.items() if d == "received"),
    }


def _outer_steps(algorithm) -> int | None:
    return getattr(algorithm, "outer_steps", getattr(algorithm, "steps", None))


def _report(algorithm, algo: str, task, optimizer, hp: Hyper, step: int) -> None:
    """This step's figures for the metrics endpoint (peerlearn.telemetry)."""
    # The counters themselves, not metrics(): that builds the whole report (a
    # gossip run's log of up to 1000 exchanges), and this runs every step.
    outer = _outer_steps(algorithm)
    lrs = {"inner": optimizer.param_groups[0]["lr"]}
    if algo not in ("ddp", "local"):
        lrs["outer"] = hp.outer_lr
    telemetry.record_training(algo=algo, task=task.name, inner_step=step, outer_step=outer,
                              tokens=task.tokens_per_batch, learning_rates=lrs)


def data_stream(peer, rank: int | None, world: int, seed: int) -> tuple[int, int, int, str]:
    """(rank, world, seed, name) of the data this peer reads. rank None: no
    shard was given, so the whole corpus in an order of this peer's own,
    seeded by its identity (kept in its data dir, so a restart reads the same
    stream): peers that join a swarm of any size read independent streams
    without being numbered. RANK/WORLD still gives disjoint shards."""
    if rank is None:
        return 0, 1, derive_seed("data", seed, peer.id), f"own:{peer.id}"
    return rank, world, seed, f"shard:{rank}/{world}"


def progress_path(peer) -> Path | None:
    data_dir = getattr(getattr(peer, "cfg", None), "data_dir", None)
    return None if data_dir is None else Path(data_dir) / own_progress.PROGRESS_FILE


def train(peer, task, algo: str, hp: Hyper, *, steps: int, rank: int | None = 0,
          world: int = 1, seed: int = 0, eval_batches: int = 20, progress_every: int = 0,
          progress: Callable[[dict], None] | None = None,
          stop: Callable[[], bool] | None = None, wait_peers: int = 0,
          traffic_from: dict[tuple[str, str], int] | None = None) -> dict:
    """Runs `steps` inner steps on this peer's data (data_stream); returns the
    report. A peer restarted in the same data dir for the same run resumes
    its inner optimizer, schedule and data position (progress.py).

    The peer must be started (and is left running: the caller closes it).
    `progress(row)` is called every `progress_every` steps with the loss and
    throughput so far; `stop()` ends the run early (a signal); `wait_peers`:
    start only once that many peers are heard from (then sync the state).
    The report's bytes are what this process moved since `traffic_from`
    (traffic_bytes() then; default: when this is called): `peerlearn run`
    passes the counts from before its peer started, so a joiner's first
    state sync and the control messages of joining are in its report."""
    if traffic_from is None:
        traffic_from = traffic_bytes()
    if wait_peers:
        peer.wait_for_peers(wait_peers, timeout=300)
    peer.sync_state()
    model = task.model
    optimizer = task.inner_optimizer(model.parameters())
    scheduler = task.schedule(optimizer, steps) if task.schedule is not None else None
    rank, world, data_seed, stream = data_stream(peer, rank, world, seed)
    algorithm = make(algo, peer, model, optimizer, hp, rank=rank if stream.startswith("shard")
                     else derive_seed("rank", peer.id) % (1 << 31))
    batches = task.batches(rank, world, data_seed)
    path = progress_path(peer) if algo in RESUMABLE else None
    run_id = {"algo": algo, "hyper": asdict(hp), "task": task.name,
              "fingerprint": task.fingerprint, "seed": seed, "steps": steps, "stream": stream}
    resumed = own_progress.load(path, run_id, optimizer=optimizer, scheduler=scheduler) \
        if path is not None else None
    first, tokens = (resumed[0] + 1, resumed[1]) if resumed is not None else (1, 0)
    for _ in range(first - 1):
        next(batches)  # the data position: the same stream, where it stopped

    def keep_progress(step: int) -> None:
        if path is not None:
            try:
                own_progress.save(path, run_id, step=step, tokens=tokens, optimizer=optimizer,
                                  scheduler=scheduler)
            except (OSError, ValueError) as e:
                log.warning("could not keep training progress in %s: %s", path, e)
    outer_seen = _outer_steps(algorithm)
    started = time.monotonic()
    compute = 0.0
    loss_sum, loss_n = 0.0, 0
    done = first - 1
    curve: list[tuple[int, float]] = []  # (step, mean training loss since the last row)
    # The agreed state's hash at every shared step this peer saw: peers of one
    # run must list the same hash for every step they share (bit parity).
    hashes: dict[int, str] = {}
    for step in range(first, steps + 1):
        if stop is not None and stop():
            break
        t0 = time.monotonic()
        batch = next(batches)
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if algo == "ddp":
            compute += time.monotonic() - t0
            try:
                algorithm.step()  # the mean gradient replaces ours
            except CollectiveTimeout:
                if stop is not None and stop():
                    break  # interrupted (Peer.interrupt): this step is not taken
                raise
            t0 = time.monotonic()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        compute += time.monotonic() - t0
        tokens += task.tokens_per_batch
        if algo == "diloco":
            algorithm.step(tokens=task.tokens_per_batch)
        elif algo != "ddp":
            algorithm.step()
        loss_sum += float(loss.detach())
        loss_n += 1
        done = step
        if _outer_steps(algorithm) != outer_seen:  # an outer step: a restart resumes here
            outer_seen = _outer_steps(algorithm)
            keep_progress(step)
        _report(algorithm, algo, task, optimizer, hp, step)
        if peer.step not in hashes:  # a loop round trip only when the shared step moved
            shared = peer.state_fingerprint()
            if shared is not None:
                hashes.setdefault(shared[0], shared[1])
        if progress_every and step % progress_every == 0:
            wall = time.monotonic() - started
            curve.append((step, loss_sum / loss_n))
            telemetry.record_training(loss=loss_sum / loss_n)
            if progress is not None:
                progress({"step": step, "loss": loss_sum / loss_n, "tokens": tokens,
                          "tokens_per_s": tokens / wall, "swarm_step": peer.step})
            loss_sum, loss_n = 0.0, 0
    finish = getattr(algorithm, "finish", None)
    if finish is not None and not (stop is not None and stop()):
        finish()  # gossip runs: the final merge, when asked for
        shared = peer.state_fingerprint()
        if shared is not None:
            hashes.setdefault(shared[0], shared[1])
    keep_progress(done)
    wall = time.monotonic() - started
    # DiLoCo family: the agreed outer params. Gossip runs: this peer's own
    # model (after a final merge, the merged params, the same at every peer).
    final = agreed_model(model, peer.state)
    return {
        "algo": algo, "hyper": asdict(hp), "inner_steps": done, "tokens": tokens,
        "val_loss": task.evaluate(final, eval_batches),
        "wall_s": wall, "compute_s": compute,
        "compute_utilisation": compute / wall if wall > 0 else 0.0,
        **bytes_report(traffic_from),
        "swarm_step": peer.step,
        # Time not spent computing, per outer step: the rounds' cost as the
        # caller feels it (waiting for a round, applying, syncing).
        "outer_overhead_s": (wall - compute) / max(1, _outer_steps(algorithm) or 0),
        "loop_lag_max_s": getattr(peer, "loop_lag_max", lambda: None)(),
        "algorithm": algorithm.metrics() if hasattr(algorithm, "metrics") else {},
        "curve": curve,
        "state_hashes": {str(k): v for k, v in sorted(hashes.items())},
    }
