"""DiLoCo: Distributed Low-Communication training of language models
(Douillard et al., arXiv:2311.08105, Algorithm 1).

    for t = 1..T:                                       # one outer step per H inner steps
        θ_i ← θ(t−1)                                    # restart from the outer params
        repeat H times: θ_i ← InnerOpt(θ_i, ∇f(x ~ D_i, θ_i))
        Δ(t) ← mean_i (θ(t−1) − θ_i)                    # the only communication: one all-reduce
        θ(t) ← OuterOpt(θ(t−1), Δ(t))                   # Nesterov(0.7, 0.9) by default

Here "parallel for i" is the swarm: each peer runs one replica, and the caller
does the inner loop (forward, backward, `optimizer.step()`) and then calls
`DiLoCo.step()`, which does the rest.

Where state lives (the invariant everything else follows from):
  * Shared (in the peer's SharedState, byte-identical on every peer at a step,
    covered by parity checks and checkpoints): the outer parameters
    `outer/<param name>` (fp32, CPU), the outer optimizer's state under
    `outer_opt/` (momentum buffers and the int64 outer step `outer_opt/step`).
    They change only inside the all-reduce's `apply` callback, which every
    participant runs on the same mean.
  * Local (each replica's own): the model's parameters between outer steps,
    the inner optimizer's state (never reset, never synchronised: DiLoCo §6.1
    found no gain in syncing it), the model's buffers (BatchNorm statistics
    and the like are not synchronised), the counters.

Faults, handled inside `step()` so that a training loop needs no try/except
for ordinary swarm events:
  * StateReplaced: our shared state was replaced by the swarm's (we fell
    behind or differed). The local progress of this round is measured against
    a state that is gone, so it is dropped: the model is reloaded from the
    new outer params and the inner counter restarts (torchft heals this way).
  * CollectiveTimeout: the outer step is skipped and counted; the replica
    keeps training from its own parameters, so its next pseudo-gradient spans
    both rounds (the paper's "dropped outer gradient" ablation, §1.1).
  * PeerClosed is raised: it ends training.

Weighting (`weighted=True`, DiLoCo §6.1 "weighted average of outer
gradients"): the swarm only computes means, so each replica sends Δ_i·w_i and
w_i (its token count) and the apply divides: mean(Δ·w) / mean(w) =
Σ w_i Δ_i / Σ w_i; the participant count cancels, so it stays right when a
replica is missing from a round. w_i travels as one codec block of equal
values (named so it sorts first in the flat contribution): a block codec
(int8, E3M0, ...) scales a block by its absmax, so such a block decodes
exactly and never shares a scale with the pseudo-gradients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from peerlearn.algorithms.outer import STEP, Nesterov, OuterOptimizer, sub_state
from peerlearn.state.shared import SharedState
from peerlearn.swarm.errors import CollectiveTimeout, PeerClosed, PeerError, StateReplaced

OUTER = "outer/"  # outer parameter of each model parameter: OUTER + name
OUTER_OPT = "outer_opt/"  # the outer optimizer's state
LOST_WORK_LOG_EVERY_S = 60.0
log = logging.getLogger(__name__)
WEIGHT = "#weight"  # sorts before any parameter name ('#' < '.', digits, letters, '_')


def default_outer() -> Nesterov:
    """The paper's outer optimizer: Nesterov, lr 0.7, momentum 0.9 (Table 5)."""
    return Nesterov(0.7, 0.9)


def named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters DiLoCo synchronises: all of them, by name (tied weights once)."""
    return dict(model.named_parameters())


def outer_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the model's parameters: the initial outer params."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in named_params(model).items()}


def pseudo_gradient(outer: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter],
                    names) -> dict[str, torch.Tensor]:
    """Δ = θ_outer − θ_local (old minus new, DiLoCo's sign), fp32 on CPU,
    written into one flat buffer the returned tensors are views of, in sorted
    name order: a round takes that buffer as it is (`donate`, api.flatten)."""
    order = sorted(names)
    flat = torch.empty(sum(params[n].numel() for n in order), dtype=torch.float32)
    out, at = {}, 0
    for n in order:
        view = flat[at:at + params[n].numel()].view(params[n].shape)
        torch.sub(outer[OUTER + n], params[n].detach().to("cpu", torch.float32), out=view)
        out[n] = view
        at += params[n].numel()
    return out


@torch.no_grad()
def load_outer(params: Mapping[str, nn.Parameter], tensors: Mapping[str, torch.Tensor],
               names) -> None:
    """Copies the outer params into the model (to each parameter's device and dtype)."""
    for n in names:
        params[n].copy_(tensors[OUTER + n])


def check_layout(state: SharedState, params: Mapping[str, nn.Parameter], names,
                 opt_prefix: str, outer: OuterOptimizer) -> None:
    """Refuses a shared state that does not hold what this algorithm needs (a
    peer started with another model or optimizer): failing here beats a KeyError
    inside an apply callback on the daemon's thread."""
    for n in names:
        t = state.tensors.get(OUTER + n)
        if t is None or t.dtype != torch.float32 or t.shape != params[n].shape:
            raise ValueError(f"shared state has no fp32 {OUTER + n} "
                             f"shaped {tuple(params[n].shape)}")
    want = outer.init_state({n: params[n] for n in names})
    have = sub_state(state.tensors, opt_prefix)
    for k, t in want.items():
        if k not in have or have[k].shape != t.shape or have[k].dtype != t.dtype:
            raise ValueError(f"shared state lacks {opt_prefix + k} for {outer!r}")


def weigh(delta: dict[str, torch.Tensor], weight: float, block: int) -> dict[str, torch.Tensor]:
    """The contribution for a weighted mean: Δ·w, and w as one codec block."""
    out = {n: d.mul_(weight) for n, d in delta.items()}
    out[WEIGHT] = torch.full((block,), float(weight), dtype=torch.float32)
    return out


def unweigh(mean: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Σ w_i Δ_i / Σ w_i from the mean of weigh()'s contributions; None when no
    participant trained on anything (every peer decides alike: same mean)."""
    w = mean[WEIGHT][0]
    if not bool(w > 0):
        return None
    return {n: t / w for n, t in mean.items() if n != WEIGHT}


def block_size(peer) -> int:
    cfg = getattr(peer, "cfg", None)
    return int(getattr(cfg, "block_size", 64) or 64)


def completed(pending) -> bool:
    """After withdraw(): did the round take our contribution anyway and apply?
    ("one whose round is already running still completes for everyone's sake")."""
    if not pending.done():
        return False
    try:
        pending.result(0)
    except PeerClosed:
        raise
    except PeerError:
        return False
    return True


class OuterLoop:
    """What the DiLoCo family shares: the model's parameters by name, the peer,
    counters for metrics, and the handling of swarm faults around one
    contribution. Subclasses say what to send and how to apply it."""

    def __init__(self, peer, model: nn.Module, inner_optimizer, *, timeout: float | None):
        self.peer = peer
        self.model = model
        self.inner_optimizer = inner_optimizer  # kept local and untouched (DiLoCo §6.1)
        self.timeout = timeout
        self.params = named_params(model)
        self.names = sorted(self.params)
        self.inner_steps = 0  # inner steps since construction
        self.local_steps = 0  # inner steps since the model last took the outer params
        self.outer_steps = 0  # outer steps this replica took part in
        self.skipped = 0  # outer steps skipped on CollectiveTimeout
        self.replaced = 0  # StateReplaced events (model reloaded from the swarm)
        self._base_step = -1  # the shared step the local model was last reset at
        self._reloaded_at = time.monotonic()
        self._lost = (0, -1, -1e18)  # (outer steps lost in a row, outer_steps then, logged at)
        self.last_mean: Mapping[str, torch.Tensor] | None = None

    # -------------------------------------------------------------- state access

    def _state(self) -> SharedState:
        state = self.peer.state
        if state is None:
            raise PeerClosed("the peer holds no shared state (not started?)")
        return state

    def _state_moved(self) -> bool:
        """True if the shared state changed under us: a state transfer (we had
        fallen behind) replaced it between our own rounds."""
        return self._state().step != self._base_step

    def reload(self) -> None:
        """The model takes the swarm's outer params; the inner counter restarts."""
        state = self._state()
        load_outer(self.params, state.tensors, self.names)
        self.local_steps = 0
        self._base_step = state.step
        self._reloaded_at = time.monotonic()

    def replaced_by_swarm(self) -> None:
        """Our local progress was made against a shared state the swarm has
        left (we fell behind, or differed): it is dropped and the model takes
        the swarm's state. A peer that loses its work round after round is
        too slow for the swarm's rounds: it says so (at most once a minute),
        since otherwise it syncs, trains and sends nothing, silently."""
        self.replaced += 1
        moved = self._state().step - self._base_step
        took = time.monotonic() - self._reloaded_at
        streak, at_outer, logged = self._lost
        streak = streak + 1 if at_outer == self.outer_steps else 1
        if streak >= 2 and time.monotonic() - logged >= LOST_WORK_LOG_EVERY_S:
            logged = time.monotonic()
            log.warning("%d outer steps of local work lost in a row: the swarm applied %d "
                        "rounds while this peer ran its %d inner steps (%.0f s), so its "
                        "update was against a state that is gone. This peer is slower than "
                        "the swarm's rounds and cannot contribute until it runs them faster "
                        "(a faster device, a smaller batch) or the swarm's H grows.",
                        streak, moved, self.local_steps, took)
        self._lost = (streak, self.outer_steps, logged)
        self.reload()

    def metrics(self) -> dict[str, int]:
        return {"inner_steps": self.inner_steps, "outer_steps": self.outer_steps,
                "outer_skipped": self.skipped, "state_replaced": self.replaced,
                "shared_step": self._state().step}

    # -------------------------------------------------------------- one contribution

    def _wait(self, pending) -> bool:
        """Waits for one contribution's round. True: it applied (its apply ran
        on our state; the mean is in `last_mean`). False: it did not, and the
        fault path already ran (StateReplaced: model reloaded; timeout:
        counted as skipped)."""
        self.last_mean = None
        try:
            self.last_mean = pending.result(self.timeout)
            return True
        except StateReplaced:
            self.replaced_by_swarm()
            return False
        except CollectiveTimeout:
            pending.withdraw()
            if completed(pending):
                self.last_mean = pending.result(0)
                return True
            self.skipped += 1
            return False


class DiLoCo(OuterLoop):
    """Synchronous DiLoCo over a swarm peer. Call `step()` after every inner
    `optimizer.step()`; every H calls (or, with `every_s`, once that many
    seconds have passed since the last outer step) it takes one outer step
    with the swarm.

        outer = Nesterov(0.7, 0.9)
        peer = Peer(cfg, initial_state=lambda: DiLoCo.initial_state(model, outer))
        algo = DiLoCo(peer.start(), model, opt, H=500, outer=outer)
        for batch in data:
            loss(model, batch).backward(); opt.step(); opt.zero_grad()
            algo.step(tokens=batch.numel())
    """

    def __init__(self, peer, model: nn.Module, inner_optimizer, *, H: int,
                 outer: OuterOptimizer | None = None, weighted: bool = False,
                 timeout: float | None = None, every_s: float | None = None):
        if H < 1:
            raise ValueError("H must be >= 1")
        if every_s is not None and not every_s > 0:
            raise ValueError("every_s must be positive")
        super().__init__(peer, model, inner_optimizer, timeout=timeout)
        self.H = H
        self.outer = outer if outer is not None else default_outer()
        # A wall-clock budget: an outer step every `every_s` seconds of
        # training, each replica running as many inner steps as fit, so a
        # slower one is never waited for nor left out; its pseudo-gradient
        # then counts by the tokens it carries (weighted, always).
        self.every_s = every_s
        self.weighted = weighted or every_s is not None
        self._tokens = 0.0
        self._window_at = time.monotonic()
        check_layout(self._state(), self.params, self.names, OUTER_OPT, self.outer)
        self.reload()  # θ_i ← θ(t−1): a joiner starts from the swarm's params

    @staticmethod
    def initial_state(model: nn.Module, outer: OuterOptimizer | None = None) -> SharedState:
        """A founder's shared state: outer params = the model's (fp32, CPU),
        fresh outer optimizer state (step 0). Pass it (or a function making it)
        as the Peer's initial_state; use the same `outer` as the DiLoCo."""
        outer = outer if outer is not None else default_outer()
        state = SharedState()
        params = outer_params(model)
        for n, t in params.items():
            state.register(OUTER + n, t)
        for k, t in outer.init_state(params).items():
            state.register(OUTER_OPT + k, t)
        return state

    @property
    def outer_step(self) -> int:
        """Outer steps the swarm has applied (shared, agreed)."""
        return int(self._state().tensors[OUTER_OPT + STEP])

    def step(self, tokens: float = 0) -> bool:
        """One inner step done (`tokens`: what it trained on, used when
        weighted). Returns True when this call took an outer step."""
        self.inner_steps += 1
        self.local_steps += 1
        self._tokens += tokens
        if not self._due():
            return False
        if self._state_moved():  # the swarm replaced our state since we last synced
            self.replaced_by_swarm()
            return False
        delta = pseudo_gradient(self._state().tensors, self.params, self.names)
        if self.weighted:
            delta = weigh(delta, self._tokens, block_size(self.peer))
        pending = self.peer.all_reduce_async(delta, apply=self.make_apply(), donate=True)
        if not self._wait(pending):
            # Timeout: keep training from our own params; local_steps goes on
            # counting, so the next attempt comes H steps (or one budget)
            # later and its Δ (and its token weight) spans both rounds.
            self._window_at = time.monotonic()
            return False
        self.reload()  # θ_i ← θ(t): the new outer params
        self.outer_steps += 1
        return True

    def _due(self) -> bool:
        if self.every_s is None:
            return self.local_steps % self.H == 0
        return time.monotonic() - self._window_at >= self.every_s

    def reload(self) -> None:
        super().reload()
        self._tokens = 0.0  # the weight of progress that is now dropped or sent
        # Every participant reloads as the round applies: the budgets of the
        # next outer step start together, whatever each replica's speed.
        self._window_at = time.monotonic()

    def make_apply(self) -> Callable[[SharedState, Mapping[str, torch.Tensor]], None]:
        """θ(t) ← OuterOpt(θ(t−1), Δ(t)) on the shared state. Runs on every
        participant; reads only (state, mean) and this DiLoCo's constants."""
        outer, names, weighted = self.outer, self.names, self.weighted

        def apply(state: SharedState, mean: Mapping[str, torch.Tensor]) -> None:
            grads = unweigh(mean) if weighted else dict(mean)
            if grads is None:
                return
            params = {n: state.tensors[OUTER + n] for n in names}
            outer.step(params, grads, sub_state(state.tensors, OUTER_OPT))

        return apply


__all__ = ["DiLoCo", "OUTER", "OUTER_OPT", "OuterLoop", "default_outer"]
