"""What the gossip algorithms share: NoLoCo (`noloco.py`) and gossip averaging
with or without variance correction (`gossip.py`) train with no global
collective; each outer step a peer averages with a small group of others,
chosen by `Peer.gossip`'s seeded pairing, and goes on whatever happens.

Where state lives (the invariant the rest follows from):
  * Shared (the swarm's SharedState: byte-identical at every peer of a step,
    covered by parity checks, state repair of joiners and checkpoints), only
    what the peers agree on:
      `gossip/config`  the run's configuration (algorithm, H, group size,
                       update constants, merge step, pairing seed) as
                       canonical JSON bytes: a peer started with other
                       settings refuses the state at once, not after
                       thousands of silently mismatched exchanges;
      `merged/<param>` fp32: the founder's initial parameters, and after a
                       merge the merged ones (what a joiner starts from);
      `merged/count`   int64: merges applied (0: these are the initial params).
    They change only in the merge all-reduce's `apply`, which every
    participant runs on the same mean.
  * Local, by design different at every peer: the model's parameters, the
    algorithm's own outer state (NoLoCo's slow weights and momentum, fp32 on
    the CPU), the inner optimizer's state, the gossip round counter.
  * This peer's own progress (the model's parameters, the algorithm's outer
    state, the gossip round) is in its own checkpoint, `local_path` (the
    data dir's gossip-local.ckpt), written atomically after every outer step
    in the shared checkpoint's format (checked on load, nothing unpickled). A
    restarted peer resumes from it, unless the file is of another run or the
    swarm merged since it was written (the merge supersedes it); a file that
    does not load is logged and set aside, never fatal. Not in it: the inner
    optimizer's state (the training loop starts it afresh, as for DiLoCo).

Joiners: the view changes only at rounds, and gossip runs hold none of their
own, so a peer joining a gossip run would never be paired. Each peer asks
about once a second whether someone waits to enter the view
(`Peer.joiners_waiting`: a synced live peer heartbeating from outside it, or
itself) and if so submits an empty round without waiting for it (`admit`);
the members notice within a heartbeat of each other, the round takes them
and the joiner, and the new view pairs it. No training time is spent on it;
it is the only round a gossip run holds besides the merge.

Faults never reach the training loop except PeerClosed:
  * a failed exchange (partner gone, partition, timeout, views that disagree
    on the pairing) skips that outer step's averaging, counted; the peer
    trains on. A partner at a later gossip round tells its round and waits
    there; the peer behind tries again at once at that round
    (`gossip.next_round`), within the same gossip timeout: the two sides of
    a healed partition, which trained at different speeds, meet again.
  * a peer alone in its live view (the rest partitioned away) takes its outer
    step with a group of one (counted as `alone`, not as a failure).
  * the merge is an ordinary round (`Peer.all_reduce`): a peer whose state
    the swarm replaced meanwhile finds the merge in the new state and takes
    it; one that times out keeps its own parameters (counted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from peerlearn.state import checkpoint
from peerlearn.state.checkpoint import CheckpointError
from peerlearn.state.shared import SharedState
from peerlearn.swarm.errors import (
    CollectiveTimeout,
    GossipFailed,
    PeerClosed,
    PeerError,
    StateReplaced,
)
from peerlearn.swarm.gossip import GROUPINGS, MAX_ROUND, next_round

CONFIG = "gossip/config"
MERGED = "merged/"
MERGE_COUNT = "merged/#count"  # '#' keeps it apart from any parameter name
LOCAL_FILE = "gossip-local.ckpt"  # in the data dir: this peer's own progress
LOCAL_MODEL = "model/"
LOCAL_CONFIG = "#config"
LOCAL_COUNTERS = "#counters"  # int64 [merges seen, round, inner steps, outer steps]
ADMIT_EVERY = 1.0  # seconds between asking whether a joiner waits to enter the view
ADMIT_BACKOFF_MAX = 64.0  # ... at most, after admission rounds that took nobody in
MAX_LOGGED = 1000  # exchanges kept in the report's distance log
# Attempts of one outer step's exchange: the first, and meeting partners that
# told a later round (honest ones need one more). Each attempt sends our whole
# tensor, so a member claiming ever later rounds gets at most this many.
MEET_ATTEMPTS = 3

log = logging.getLogger(__name__)


def config_tensor(config: Mapping[str, object]) -> torch.Tensor:
    """Canonical JSON bytes (sorted keys, no spaces) of the run's configuration."""
    raw = json.dumps(dict(config), sort_keys=True, separators=(",", ":")).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def fp32_params(params: Mapping[str, nn.Parameter], names) -> dict[str, torch.Tensor]:
    """fp32 CPU copies (new tensors) of the model's parameters."""
    return {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}


@torch.no_grad()
def load_params(params: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor],
                names, prefix: str = "") -> None:
    for n in names:
        params[n].copy_(values[prefix + n])


def derive_seed(*parts: object) -> int:
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


@torch.no_grad()
def independent_init(params: Mapping[str, nn.Parameter], seed: int) -> None:
    """Makes this peer's initial parameters uncorrelated with every other
    peer's while keeping the task's initial distribution: each tensor's
    entries are permuted by a generator seeded with `seed`. The values (so
    each tensor's mean and variance) are exactly the task's; constant
    tensors (LayerNorm gains, zero biases) stay as they are, which is what an
    independent draw of the task's init would give them too."""
    g = torch.Generator().manual_seed(seed)
    for n in sorted(params):
        p = params[n]
        flat = p.detach().reshape(-1).clone()
        p.copy_(flat[torch.randperm(flat.numel(), generator=g)].view_as(p))


def rms(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names) -> float:
    """Root mean square of a − b over every element of the named tensors."""
    total, count = 0.0, 0
    for n in names:
        d = (a[n].double() - b[n].double())
        total += float(d.pow(2).sum())
        count += d.numel()
    return (total / count) ** 0.5 if count else 0.0


class GossipLoop:
    """The gossip algorithms' frame: the step counter, the exchange with its
    fault handling and round catch-up, the merge, the shared-state layout and
    the report. Subclasses implement `outer_step()` (every H inner steps)
    and may override `after_merge()`."""

    def __init__(self, peer, model: nn.Module, inner_optimizer, *, H: int, config: dict,
                 group: int = 2, seed: int = 0, merge_at: int = 0, grouping: str = "random",
                 init_seed: int | None = None, timeout: float | None = 120.0,
                 gossip_timeout: float = 30.0, local_path: str | Path | None = None):
        if H < 1:
            raise ValueError("H must be >= 1")
        if group < 2:
            raise ValueError("a gossip group has at least 2 members")
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping {grouping!r}: one of {', '.join(GROUPINGS)}")
        if merge_at < -1:
            raise ValueError("merge_at: 0 (never), -1 (at the end) or an inner step")
        self.peer, self.model = peer, model
        self.inner_optimizer = inner_optimizer  # local, never synchronised
        self.H, self.group, self.seed, self.merge_at = H, group, seed, merge_at
        self.grouping = grouping
        self.timeout, self.gossip_timeout = timeout, gossip_timeout
        self.params = dict(model.named_parameters())
        self.names = sorted(self.params)
        self.config = dict(config)
        cfg = getattr(peer, "cfg", None)
        self.codec = getattr(cfg, "codec", None)
        self.block_size = int(getattr(cfg, "block_size", 64) or 64)
        self.inner_steps = 0
        self.local_steps = 0  # inner steps since the last outer step
        self.outer_steps = 0
        self.round = 0  # gossip round: pairs meet where their rounds agree
        self.exchanges = 0
        self.failures = 0
        self.caught_up = 0  # rounds skipped to meet partners that were ahead
        self.alone = 0
        self.merges = 0
        self.merge_failures = 0
        self.merge_participants = 0
        self.distances: list[tuple[int, float, float]] = []  # (outer step, unix time, rms)
        self.admissions = 0  # rounds held to take joiners into the view
        self.admission_failures = 0
        self._admission = None  # the pending admission round, if any
        self._admit_at = 0.0  # monotonic time of the next check
        self._admit_every = ADMIT_EVERY
        self._admit_view = 0  # members when the pending admission was submitted
        self.local_path = None if local_path is None else Path(local_path)
        self.resumed = False  # from this peer's own checkpoint
        state = self._state()
        self.check_layout(state)
        if init_seed is not None and int(state.tensors[MERGE_COUNT]) == 0:
            independent_init(self.params, init_seed)
        else:  # the swarm's agreed params: the founder's init, or the last merge
            load_params(self.params, state.tensors, self.names, MERGED)
        self.init_outer_state()
        self.resume()

    def init_outer_state(self) -> None:
        """Subclasses: their own outer state, from the model's parameters as
        they are now (called once, before `resume`)."""

    def outer_state(self) -> dict[str, torch.Tensor]:
        """Subclasses: the outer state a restart must not lose (fp32 CPU
        tensors, by name); `load_outer_state` takes the same back."""
        return {}

    def load_outer_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        pass

    # ------------------------------------------------------------ own checkpoint

    def save_local(self) -> None:
        """This peer's progress to local_path, atomically (old file or new,
        never a torn one)."""
        if self.local_path is None:
            return
        own = SharedState(self.inner_steps)
        own.register(LOCAL_CONFIG, config_tensor(self.config))
        own.register(LOCAL_COUNTERS, torch.tensor(
            [int(self._state().tensors[MERGE_COUNT]), self.round, self.inner_steps,
             self.outer_steps], dtype=torch.int64))
        for n in self.names:
            own.register(LOCAL_MODEL + n, self.params[n].detach().to("cpu", torch.float32))
        for n, t in self.outer_state().items():
            own.register(n, t)
        checkpoint.save(own, self.local_path)

    def resume(self) -> bool:
        """Takes this peer's progress back from local_path, if it holds this
        run's and no merge came after it. On any refusal the peer keeps what
        it has (the swarm's params) and the reason is logged."""
        if self.local_path is None or not self.local_path.exists():
            return False
        try:
            own = checkpoint.load(self.local_path).tensors
            for n, t in own.items():  # a NaN model or momentum would poison every merge
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{n} holds non-finite values (NaN or inf)")
            counters = own[LOCAL_COUNTERS]
            if not torch.equal(own[LOCAL_CONFIG], config_tensor(self.config)):
                raise ValueError("it is of a run with other settings")
            if counters.dtype != torch.int64 or counters.shape != (4,):
                raise ValueError("its counters are malformed")
            merges, rnd, inner, outer = (int(c) for c in counters)
            if not (0 <= rnd <= MAX_ROUND and 0 <= outer <= inner and merges >= 0):
                raise ValueError("its counters are out of range")
            if merges < int(self._state().tensors[MERGE_COUNT]):
                raise ValueError("the swarm merged since it was written")
            for n in self.names:
                if own[LOCAL_MODEL + n].shape != self.params[n].shape:
                    raise ValueError(f"{n} has another shape")
            mine = self.outer_state()
            for n, t in mine.items():
                if own[n].dtype != t.dtype or own[n].shape != t.shape:
                    raise ValueError(f"{n} has another dtype or shape")
        except (CheckpointError, OSError, KeyError, ValueError) as e:
            log.warning("not resuming from %s: %s", self.local_path, e)
            return False
        load_params(self.params, own, self.names, LOCAL_MODEL)
        self.load_outer_state({n: own[n] for n in mine})
        self.round, self.inner_steps, self.outer_steps = rnd, inner, outer
        self.resumed = True
        log.info("resumed from %s: outer step %d, gossip round %d", self.local_path, outer, rnd)
        return True

    # ------------------------------------------------------------ shared state

    @staticmethod
    def initial_state(model: nn.Module, config: Mapping[str, object]) -> SharedState:
        """A founder's shared state: the configuration, the model's parameters
        as `merged/` (fp32, CPU) and a merge count of 0."""
        state = SharedState()
        state.register(CONFIG, config_tensor(config))
        for n, p in model.named_parameters():
            state.register(MERGED + n, p.detach().to("cpu", torch.float32).clone())
        state.register(MERGE_COUNT, torch.zeros((), dtype=torch.int64))
        return state

    def check_layout(self, state: SharedState) -> None:
        """Refuses a state made for another run (other settings or model):
        ValueError here beats exchanges that never match, or a KeyError in an
        apply on the daemon's thread."""
        have = state.tensors.get(CONFIG)
        want = config_tensor(self.config)
        if have is None or not torch.equal(have, want):
            theirs = bytes(have.tolist()).decode(errors="replace") if have is not None else "none"
            raise ValueError(f"the swarm runs {theirs}, this peer "
                             f"{bytes(want.tolist()).decode()}")
        for n in self.names:
            t = state.tensors.get(MERGED + n)
            if t is None or t.dtype != torch.float32 or t.shape != self.params[n].shape:
                raise ValueError(f"shared state has no fp32 {MERGED + n} "
                                 f"shaped {tuple(self.params[n].shape)}")
        count = state.tensors.get(MERGE_COUNT)
        if count is None or count.dtype != torch.int64 or count.numel() != 1:
            raise ValueError(f"shared state has no int64 {MERGE_COUNT}")

    def _state(self) -> SharedState:
        state = self.peer.state
        if state is None:
            raise PeerClosed("the peer holds no shared state (not started?)")
        return state

    # ------------------------------------------------------------ the loop

    def step(self) -> bool:
        """One inner step done. Every H calls an outer step (True returned);
        at inner step `merge_at` the merge."""
        self.inner_steps += 1
        self.local_steps += 1
        self.admit()
        took = False
        if self.local_steps % self.H == 0:
            self.local_steps = 0
            self.outer_step()
            self.outer_steps += 1
            took = True
        merge_now = self.merge_at > 0 and self.inner_steps == self.merge_at
        if merge_now:
            self.merge()
        if took or merge_now:
            self.save_local()
        return took

    def admit(self) -> None:
        """Takes joiners into the view (see the module docstring): submits an
        empty round when one waits, and collects its outcome later; never
        waits for it. A round that fails (the swarm moved on, a timeout) is
        counted and asked for again at the next check. A round that took
        nobody new in (a peer that heartbeats as synced and never
        contributes) doubles the wait before the next, up to
        ADMIT_BACKOFF_MAX: such a peer costs the swarm a bounded share of
        small rounds, not one a second for ever."""
        if self._admission is not None:
            if not self._admission.done():
                return
            try:
                self._admission.result(0)
                self.admissions += 1
            except PeerClosed:
                raise
            except PeerError:
                self.admission_failures += 1
            self._admission = None
            grew = len(self.peer.members()) > self._admit_view
            self._admit_every = ADMIT_EVERY if grew else min(2 * self._admit_every,
                                                             ADMIT_BACKOFF_MAX)
            self._admit_at = time.monotonic() + self._admit_every
        now = time.monotonic()
        if now < self._admit_at:
            return
        self._admit_at = now + self._admit_every
        if self.peer.joiners_waiting():
            self._admit_view = len(self.peer.members())
            self._admission = self.peer.all_reduce_async({"admit": torch.zeros(1)})

    def _drop_admission(self) -> None:
        if self._admission is not None:
            self._admission.withdraw()
            self._admission = None

    def finish(self) -> None:
        """End of the run: the final merge, when it is asked for (merge_at = -1)."""
        self._drop_admission()
        if self.merge_at == -1:
            self.merge()
            self.save_local()

    def outer_step(self) -> None:
        raise NotImplementedError

    def exchange(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The mean of tensors over this round's group, or None when this
        outer step goes without averaging (a failure, counted, or alone)."""
        if len(self.peer.live_members()) < 2:
            self.alone += 1
            self.round += 1
            return None
        deadline = time.monotonic() + self.gossip_timeout
        for attempt in range(1, MEET_ATTEMPTS + 1):
            try:
                out = self.peer.gossip(tensors, round_=self.round, seed=self.seed,
                                       group_size=self.group, grouping=self.grouping,
                                       codec=self.codec,
                                       block_size=self.block_size,
                                       timeout=max(0.1, deadline - time.monotonic()))
                break
            except GossipFailed as e:
                nxt = next_round(self.round, e.rounds.values())
                self.caught_up += nxt - self.round - 1
                self.round = nxt
                if e.ahead and attempt < MEET_ATTEMPTS and time.monotonic() < deadline:
                    continue  # the partners ahead wait for us at nxt
                self.failures += 1
                log.info("outer step %d goes without averaging: %s", self.outer_steps + 1, e)
                return None
        self.round += 1
        self.exchanges += 1
        return out

    def log_distance(self, distance: float) -> None:
        self.distances.append((self.outer_steps + 1, time.time(), distance))
        del self.distances[:-MAX_LOGGED]

    # ------------------------------------------------------------ the merge

    def merge(self) -> bool:
        """One agreed all-reduce of the model's parameters ("a single merging
        suffices"): the mean lands in the shared state's `merged/` on every
        participant byte for byte, and the model takes it. A peer left out of
        the round (late, or its state replaced) takes the merge from the
        state it syncs to. Returns whether the model now holds a merge."""
        self._drop_admission()  # the merge's own round takes any joiner in
        before = int(self._state().tensors[MERGE_COUNT])
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                self.peer.all_reduce(fp32_params(self.params, self.names),
                                     apply=self.make_merge_apply(), timeout=left)
            except StateReplaced:
                pass  # the swarm moved on without us: its state may hold the merge
            except CollectiveTimeout:
                break
            if int(self._state().tensors[MERGE_COUNT]) > before:
                break
        state = self._state()
        if int(state.tensors[MERGE_COUNT]) <= before:
            self.merge_failures += 1
            return False
        load_params(self.params, state.tensors, self.names, MERGED)
        self.merges += 1
        self.merge_participants = len(self.peer.members())
        self.after_merge()
        return True

    def make_merge_apply(self) -> Callable[[SharedState, Mapping[str, torch.Tensor]], None]:
        """merged ← mean of the participants' parameters; count + 1. Runs on
        every participant on the same mean: deterministic copies only."""
        names = self.names

        def apply(state: SharedState, mean: Mapping[str, torch.Tensor]) -> None:
            for n in names:
                state.tensors[MERGED + n].copy_(mean[n])
            state.tensors[MERGE_COUNT].add_(1)

        return apply

    def after_merge(self) -> None:
        """The model holds the merged params; subclasses reset what depends on them."""

    # ------------------------------------------------------------ report

    def metrics(self) -> dict:
        return {"inner_steps": self.inner_steps, "outer_steps": self.outer_steps,
                "exchanges": self.exchanges, "exchange_failures": self.failures,
                "alone": self.alone, "gossip_round": self.round,
                "rounds_caught_up": self.caught_up, "merges": self.merges,
                "merge_failures": self.merge_failures,
                "merge_participants": self.merge_participants,
                "admissions": self.admissions, "admission_failures": self.admission_failures,
                "shared_step": self._state().step,
                "distances": [list(d) for d in self.distances]}


__all__ = ["CONFIG", "GossipLoop", "LOCAL_FILE", "MERGED", "MERGE_COUNT", "config_tensor",
           "independent_init"]
