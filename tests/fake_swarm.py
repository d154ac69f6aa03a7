"""A deterministic, in-process stand-in for M swarm `Peer`s (no sockets, no threads).

Semantics kept from the real Peer (peerlearn/swarm/api.py):
  * Each fake peer owns a SharedState (`peer.state`, `peer.step`).
  * `all_reduce_async(tensors, apply=fn)` returns a pending handle with
    `.result(timeout)`, `.done()`, `.withdraw()`. The k-th submission of every
    peer forms round k (submission order). When all M have submitted, the
    mean is computed in fp32 in a fixed order (sum over peers 0..M-1, then
    divide by M), each peer's own `apply(state, mean)` runs on its own state,
    `state.step += 1`, and the futures settle: an apply always runs before
    its result() returns.
  * Tensors are flattened and cut back with the real `flatten`, so the mean
    has the names, shapes and dtypes that were sent.

Lockstep from one thread: the test registers `on_wait(peer)`. When a
`result()` finds its round incomplete it calls `on_wait`, which must advance
the other replicas until they submit (see `Lockstep`); if the round is still
incomplete afterwards the schedule is wrong and the fake raises.

Faults: `fail_round(k, timeout=True)` makes round k time out for everyone
(no apply, no step); `replace_state(i, k)` makes peer i's state be replaced by
the swarm's (peer 0's after round k applied) and its round-k future fail with
StateReplaced, as a peer that had fallen behind sees it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import Future

import torch

from peerlearn.state.shared import SharedState
from peerlearn.swarm.api import flatten
from peerlearn.swarm.errors import CollectiveTimeout, StateReplaced, Withdrawn


def clone_state(state: SharedState) -> SharedState:
    out = SharedState(state.step)
    for n, t in state.tensors.items():
        out.register(n, t.clone())
    return out


class FakePending:
    def __init__(self, peer: FakePeer, k: int, future: Future, unflatten):
        self.peer, self.k, self.future, self.unflatten = peer, k, future, unflatten

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None):
        if not self.future.done():
            self.peer.swarm.waiting(self.peer, self.k)
        if not self.future.done():
            raise RuntimeError(f"deadlock: round {self.k} incomplete after on_wait "
                               f"(submitted: {[p.submitted for p in self.peer.swarm.peers]})")
        return self.unflatten(self.future.result())

    def withdraw(self) -> None:
        if not self.future.done():
            self.future.set_exception(Withdrawn("withdrawn"))


class FakePeer:
    def __init__(self, swarm: FakeSwarm, index: int, state: SharedState):
        self.swarm, self.index, self.state = swarm, index, state
        self.id = f"peer{index}"
        self.submitted = 0

    @property
    def step(self) -> int:
        return self.state.step

    def members(self) -> list[str]:
        return [p.id for p in self.swarm.peers]

    def joiners_waiting(self) -> bool:
        return False  # the fake swarm's view is fixed

    def sync_state(self, timeout: float | None = None) -> int:
        return self.state.step

    def all_reduce_async(self, tensors, *, apply=None, donate: bool = False) -> FakePending:
        flat, unflatten = flatten(tensors, donate)
        k = self.submitted
        self.submitted += 1
        fut: Future = Future()
        self.swarm.submit(self, k, flat.clone(), unflatten, apply, fut)
        return FakePending(self, k, fut, unflatten)

    def all_reduce(self, tensors, *, apply=None, timeout: float | None = None,
                   donate: bool = False):
        return self.all_reduce_async(tensors, apply=apply, donate=donate).result(timeout)


class FakeSwarm:
    def __init__(self, m: int, initial_state: SharedState | Callable[[], SharedState]):
        make = initial_state if callable(initial_state) else (lambda: clone_state(initial_state))
        first = make()
        self.peers = [FakePeer(self, i, clone_state(first)) for i in range(m)]
        self.rounds: dict[int, dict[int, tuple]] = {}
        self.on_wait: Callable[[FakePeer], None] | None = None
        self.timeouts: set[int] = set()  # round indices that time out for everyone
        self.replacements: dict[int, set[int]] = {}  # round -> peers whose state is replaced
        self.applied = 0
        self.history: list[list[bytes]] = []  # per applied round: every peer's state hash

    def fail_round(self, k: int) -> None:
        self.timeouts.add(k)

    def replace_state(self, peer: int, k: int) -> None:
        self.replacements.setdefault(k, set()).add(peer)

    def submit(self, peer: FakePeer, k: int, flat: torch.Tensor, unflatten, apply, fut) -> None:
        subs = self.rounds.setdefault(k, {})
        subs[peer.index] = (flat, unflatten, apply, fut)
        if len(subs) == len(self.peers):
            self._complete(k, self.rounds.pop(k))

    def waiting(self, peer: FakePeer, k: int) -> None:
        if self.on_wait is not None:
            self.on_wait(peer)

    def _complete(self, k: int, subs: dict[int, tuple]) -> None:
        if k in self.timeouts:
            for _, _, _, fut in subs.values():
                if not fut.done():
                    fut.set_exception(CollectiveTimeout(f"round {k} timed out"))
            return
        sizes = {subs[i][0].numel() for i in subs}
        assert len(sizes) == 1, f"round {k}: contributions of different sizes {sizes}"
        acc = subs[0][0].clone()
        for i in range(1, len(self.peers)):
            acc += subs[i][0]
        mean = acc / len(self.peers)
        for i in range(len(self.peers)):
            _, unflatten, apply, _ = subs[i]
            st = self.peers[i].state
            if apply is not None:
                apply(st, unflatten(mean.clone()))
            st.step += 1
        self.applied += 1
        for i in sorted(self.replacements.get(k, ())):
            donor = next(p for p in self.peers if p.index not in self.replacements[k])
            self.peers[i].state = clone_state(donor.state)
        self.history.append([p.state.state_hash() for p in self.peers])
        for i in range(len(self.peers)):
            fut = subs[i][3]
            if fut.done():  # withdrawn: the round still applied for everyone
                continue
            if i in self.replacements.get(k, ()):
                fut.set_exception(StateReplaced(self.peers[i].state.step))
            else:
                fut.set_result(mean.clone())


class Lockstep:
    """Drives M replicas tick by tick from one thread. `tick(i, t)` runs
    replica i's t-th inner step (and its algorithm's step()). When a replica
    blocks on a round, the others are advanced to the same tick, which makes
    them submit; re-entrant calls for a replica already at tick t do nothing."""

    def __init__(self, swarm: FakeSwarm, tick: Callable[[int, int], None]):
        self.swarm, self.tick = swarm, tick
        self.done = [0] * len(swarm.peers)  # ticks started per replica
        self.t = 0
        swarm.on_wait = self._on_wait

    def _advance(self, i: int, t: int) -> None:
        if self.done[i] > t:
            return
        self.done[i] = t + 1
        self.tick(i, t)

    def _on_wait(self, peer: FakePeer) -> None:
        for i in range(len(self.swarm.peers)):
            self._advance(i, self.t)

    def run(self, ticks: int, after: Callable[[int], None] | None = None) -> None:
        for _ in range(ticks):
            for i in range(len(self.swarm.peers)):
                self._advance(i, self.t)
            if after is not None:
                after(self.t)
            self.t += 1


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
