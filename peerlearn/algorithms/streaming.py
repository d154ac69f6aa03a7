"""Streaming DiLoCo (Douillard et al., arXiv:2501.18512, Algorithm 2).

    for step t = 1..T:
        θ_m ← InnerOpt(θ_m, ∇f(x ~ D_m, θ_m))              # all fragments always train
        if fragment p is due (t − t_p ≡ 0 mod H):
            Δ_{m,p} ← θ^glob_p − θ_{m,p}                    # send; the reduction runs meanwhile
        if fragment p was sent τ steps ago:
            block-receive Δ_p = mean_m Δ_{m,p}
            θ^glob_p ← OuterOpt_p(θ^glob_p, Δ_p)            # one outer optimizer state per fragment
            θ_{m,p} ← α·θ_{m,p} + (1 − α)·θ^glob_p          # mix the τ overlapped local steps back

Schedule (as torchft's `DiLoCo._step_post_hook`, which the golden fixtures
of the spec sheet §3.4 pin down): with per = H/P, a fragment is *sent* at
local steps ≡ per − τ (mod per) and *received* τ steps later, at multiples of
per. So some fragment syncs every H/P steps, fragment p first at (p+1)·H/P,
and each fragment sees H inner steps between its own syncs (offsets
t_p = (p+1)·H/P, spread evenly as in the paper). τ < H/P: at most one
fragment is in flight, which is what lets every replica agree on *which*
fragment a round carries without extra messages: it is the shared counter
`streaming/syncs` (rounds applied) mod P, read from the agreed state at send
time. Round-robin keyed on agreed state (torchft keys it on the manager's
step the same way) also means a joiner or a replica whose state was replaced
picks the same fragment as everyone else, and a round that timed out is
retried with the same fragment.

The pseudo-gradient is taken τ steps before the merge (sheet §9.4: torchft
and the paper agree); the τ overlapped steps survive with weight α. The merge
is `torch.lerp(θ^glob, θ_local, α)`, torchft's `p.lerp_(local, α)`.

Shared state: `outer/<param>` (fp32), `outer_opt/<p>/...` (fragment p's
outer optimizer state, its `step` counts fragment p's outer steps) and
`streaming/syncs`. Local: the model, the inner optimizer, the counters.

Fragments: a list of lists of parameter names (a partition of the model's
parameters). `fragments_of(model, P, layout)` builds them from the model's
list of blocks; parameters outside the blocks go where torchtitan puts them:
those registered before the blocks (embeddings) in the first fragment, those
after (final norm, output head) in the last. With the paper's strided layout
that keeps every fragment one block-group plus at most one end of the
network, so no fragment holds both ends. (The paper leaves this unspecified,
sheet §2.1.)

Quantization is not done here: the outer gradients go to the peer as fp32
and the peer's wire codec (`PeerConfig.codec`, E3M0 for the paper's FP4
setting) quantizes each replica's contribution; the sum is kept in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from peerlearn.algorithms.diloco import (
    OUTER,
    OUTER_OPT,
    OuterLoop,
    check_layout,
    default_outer,
    outer_params,
    pseudo_gradient,
)
from peerlearn.algorithms.outer import OuterOptimizer, sub_state
from peerlearn.state.shared import SharedState

SYNCS = "streaming/syncs"  # int64: fragment rounds applied; the next fragment is SYNCS mod P
BLOCK_ATTRS = ("blocks", "layers", "h", "layer")


def opt_prefix(p: int) -> str:
    return f"{OUTER_OPT}{p}/"


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's list of transformer blocks: a ModuleList named like
    blocks/layers/h/layer (nanoGPT, Llama, GPT-2, BERT), else the longest one."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for attr in BLOCK_ATTRS:
        for name, mod in lists:
            if name.rsplit(".", 1)[-1] == attr:
                return name, mod
    return max(lists, key=lambda nm: len(nm[1])) if lists else None


def _assign(j: int, n: int, P: int, layout: str) -> int:
    """Fragment of item j of n: strided j mod P (the paper's default) or
    sequential (contiguous, balanced: torchtitan's default)."""
    if layout == "strided":
        return j % P
    if layout == "sequential":
        return j * P // n
    raise ValueError(f"layout must be 'strided' or 'sequential', not {layout!r}")


def fragments_of(model: nn.Module, P: int, layout: str = "strided") -> list[list[str]]:
    """P lists of parameter names partitioning the model's parameters.

    Block j goes to fragment _assign(j); parameters before the blocks to the
    first fragment, after them to the last. A model without a ModuleList (or
    with fewer blocks than P) is split over its parameter list instead."""
    names = list(dict(model.named_parameters()))
    if P < 1:
        raise ValueError("P must be >= 1")
    found = find_blocks(model)
    frags: list[list[str]] = [[] for _ in range(P)]
    if found is not None and len(found[1]) >= P:
        prefix, blocks = found
        prefix = f"{prefix}." if prefix else ""
        seen_block = False
        for n in names:
            rest = n[len(prefix):] if n.startswith(prefix) else None
            head = rest.split(".", 1)[0] if rest else ""
            if rest is not None and head.isdigit() and int(head) < len(blocks):
                seen_block = True
                frags[_assign(int(head), len(blocks), P, layout)].append(n)
            else:
                frags[P - 1 if seen_block else 0].append(n)
    else:
        if len(names) < P:
            raise ValueError(f"{len(names)} parameters cannot make {P} fragments")
        for j, n in enumerate(names):
            frags[_assign(j, len(names), P, layout)].append(n)
    return frags


def check_schedule(H: int, P: int, tau: int, alpha: float) -> None:
    """Raises ValueError (one line) unless H is a positive multiple of P,
    0 <= tau < H/P (one fragment in flight) and alpha is in [0, 1]."""
    if P < 1 or H < P or H % P:
        raise ValueError(f"H={H} must be a positive multiple of P={P}")
    if not 0 <= tau < H // P:
        raise ValueError(f"tau={tau} must be in [0, H/P={H // P}): one fragment in flight")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")


class StreamingDiLoCo(OuterLoop):
    """Streaming DiLoCo over a swarm peer; call `step()` after every inner
    `optimizer.step()`.

    fragments: lists of parameter names (a partition; then P is their
    count), or None for `fragments_of(model, P, layout)`. H must be a multiple
    of P, and 0 <= tau < H/P."""

    def __init__(self, peer, model: nn.Module, inner_optimizer, *, H: int, P: int = 1,
                 tau: int = 0, alpha: float = 0.0, outer: OuterOptimizer | None = None,
                 fragments: list[list[str]] | None = None, layout: str = "strided",
                 timeout: float | None = None):
        super().__init__(peer, model, inner_optimizer, timeout=timeout)
        self.fragments = check_fragments(model, fragments if fragments is not None
                                         else fragments_of(model, P, layout))
        self.P = len(self.fragments)
        check_schedule(H, self.P, tau, alpha)
        self.per = H // self.P
        self.H, self.tau, self.alpha = H, tau, float(alpha)
        self.outer = outer if outer is not None else default_outer()
        state = self._state()
        if SYNCS not in state.tensors:
            raise ValueError(f"shared state lacks {SYNCS}: "
                             "not made by StreamingDiLoCo.initial_state")
        for p, frag in enumerate(self.fragments):
            check_layout(state, self.params, frag, opt_prefix(p), self.outer)
        self._inflight: tuple[int, object] | None = None  # (fragment, pending)
        self.reload()

    @staticmethod
    def initial_state(model: nn.Module, P: int = 1, outer: OuterOptimizer | None = None, *,
                      fragments: list[list[str]] | None = None,
                      layout: str = "strided") -> SharedState:
        """A founder's shared state; pass the same fragments/P/layout/outer as
        to the StreamingDiLoCo."""
        outer = outer if outer is not None else default_outer()
        frags = check_fragments(model, fragments if fragments is not None
                                else fragments_of(model, P, layout))
        state = SharedState()
        params = outer_params(model)
        for n, t in params.items():
            state.register(OUTER + n, t)
        for p, frag in enumerate(frags):
            for k, t in outer.init_state({n: params[n] for n in frag}).items():
                state.register(opt_prefix(p) + k, t)
        state.register(SYNCS, torch.zeros((), dtype=torch.int64))
        return state

    def reload(self) -> None:
        super().reload()
        self._inflight = None  # a replaced state failed it (and all behind it)

    def step(self) -> bool:
        """One inner step done. Returns True when a fragment merged on this call."""
        self.inner_steps += 1
        self.local_steps += 1
        merged = False
        if self.local_steps % self.per == (self.per - self.tau) % self.per:
            self._send()
        if self.local_steps % self.per == 0 and self._inflight is not None:
            merged = self._receive()
        return merged

    def _send(self) -> None:
        if self._state_moved():
            self.replaced_by_swarm()
            return
        state = self._state()
        p = int(state.tensors[SYNCS]) % self.P
        delta = pseudo_gradient(state.tensors, self.params, self.fragments[p])
        self._inflight = (p, self.peer.all_reduce_async(delta, apply=self.make_apply(p),
                                                        donate=True))

    def _receive(self) -> bool:
        p, pending = self._inflight
        self._inflight = None
        if not self._wait(pending):
            return False  # replaced: reloaded; timeout: fragment p keeps its local values
        state = self._state()
        with torch.no_grad():
            for n in self.fragments[p]:
                param = self.params[n]
                local = param.detach().to("cpu", torch.float32)
                param.copy_(torch.lerp(state.tensors[OUTER + n], local, self.alpha))
        self._base_step = state.step
        self.outer_steps += 1
        return True

    def make_apply(self, p: int) -> Callable[[SharedState, Mapping[str, torch.Tensor]], None]:
        """θ^glob_p ← OuterOpt_p(θ^glob_p, Δ_p) and syncs += 1, on every participant."""
        outer, frag, prefix = self.outer, list(self.fragments[p]), opt_prefix(p)

        def apply(state: SharedState, mean: Mapping[str, torch.Tensor]) -> None:
            params = {n: state.tensors[OUTER + n] for n in frag}
            outer.step(params, dict(mean), sub_state(state.tensors, prefix))
            state.tensors[SYNCS].add_(1)

        return apply


def check_fragments(model: nn.Module, fragments: list[list[str]]) -> list[list[str]]:
    """Fragments must be non-empty and partition the model's parameters."""
    names = set(dict(model.named_parameters()))
    flat = [n for f in fragments for n in f]
    if any(not f for f in fragments):
        raise ValueError("every fragment needs at least one parameter")
    if len(flat) != len(set(flat)) or set(flat) != names:
        raise ValueError("fragments must partition the model's parameters: "
                         f"missing {sorted(names - set(flat))[:3]}, "
                         f"unknown {sorted(set(flat) - names)[:3]}")
    return [list(f) for f in fragments]


__all__ = ["StreamingDiLoCo", "fragments_of", "find_blocks", "SYNCS"]
