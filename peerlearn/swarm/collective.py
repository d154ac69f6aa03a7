"""One round's collective on a worker thread, and the checks on its result.

With `aggregate="mean"` (the default) the round is an all-reduce: nobody
sees another member's contribution, and the bytes are 2(N-1)/N of one
contribution. A small tensor among a few peers takes the direct all-reduce
(direct.py: two one-way hops), anything larger the ring (2(N-1) hops,
pipelined, in lanes). halving.py (2 log2 N hops) is not taken yet: see
docs/swarm.md, "Rounds past 8 peers". With a
robust rule (aggregate.py) the round all-gathers every contribution
(allgather.py, N/2 times the bytes) and every participant applies the rule
to the same rows: a member that sends 1e30, a sign flip or noise moves the
result by a bounded amount, and a NaN row is left out and its sender named,
so the coordinator can shut it out (suspicion.py).

Thread: `run_collective` runs on a worker with buffers it was handed (the
submission's tensor is only read); the loop gets back a `RoundResult` with
the result already checked and hashed: nothing proportional to the model is
left for the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peerlearn.swarm import aggregate as agg
from peerlearn.swarm.actions import StartCollective
from peerlearn.swarm.allgather import ring_allgather
from peerlearn.swarm.allreduce import AllReduceAborted, CodecSpec, ring_allreduce
from peerlearn.swarm.config import PeerConfig
from peerlearn.swarm.datalinks import CHANNEL_ROUND, PeerLinks
from peerlearn.swarm.direct import DIRECT_MAX_BYTES, DIRECT_MAX_WORLD, direct_allreduce
from peerlearn.wire.codecs import hash_tensor

# Contributions at least this large are reduced in place, in the buffer the
# submission handed over (the daemon's own: api.flatten's copy, or donated):
# a peer then holds the state and one round buffer at its peak instead of
# the state, the contribution and the result (3S: docs/benchmarks.md, "State
# size"). The price: a round that fails once its ring began leaves others'
# sums in that buffer, and its contribution fails (ContributionLost) instead
# of going again. Below this, retrying is worth more than the memory.
IN_PLACE_MIN_BYTES = 64 << 20

# A round's mean may be at most this many times larger (max |x|) than this
# peer's own contribution. Honest means are at most the largest contribution:
# weighted ones (tokens) differ by the peers' token counts, so the margin is
# wide; it is there for 1e30, not for subtle shifts (docs/swarm.md).
MEAN_GROWTH_LIMIT = 1e4


@dataclass(frozen=True)
class RoundResult:
    """value: the round's aggregate (the caller owns it); refused: the
    participants whose contributions the robust rule left out as not finite
    (always empty for the mean, whose ring sees no single contribution);
    poisoned: why value must not be applied (`poisoned_mean`), or None;
    digest: value's XXH64 for the Done (all three computed on the worker)."""

    value: torch.Tensor
    refused: tuple[str, ...] = ()
    poisoned: str | None = None
    digest: bytes = b""
    spent: bool = False  # value is the contribution's own buffer: not offered again


def run_collective(links: PeerLinks, cfg: PeerConfig, me: str, a: StartCollective,
                   update: torch.Tensor | None, inflight: dict[int, list]) -> RoundResult:
    """My contribution, aggregated among a.participants (ring order).

    inflight[a.round_id] gets the links in use, so the loop can abort them.
    Raises AllReduceAborted (or the link's StreamError/TimeoutError/OSError);
    one with `spent` set failed after reducing into `update` (in place).
    """
    if update is None:  # withdrawn after our Ready went out: fail the round
        raise AllReduceAborted("no contribution: the caller withdrew it",
                               rank=a.participants.index(me), phase="contribute",
                               step=0, direction=None, cause=None)
    own_max = max_abs(update)  # before an in-place ring writes over it
    out = _aggregate(links, cfg, me, a, update, inflight)
    why = poisoned_mean(out.value, own_max if update.numel() == out.value.numel() else None)
    digest = b"" if why else hash_tensor(out.value).to_bytes(8, "little")  # native, no copy
    return RoundResult(out.value, out.refused, why, digest, out.spent)


def _aggregate(links: PeerLinks, cfg: PeerConfig, me: str, a: StartCollective,
               update: torch.Tensor, inflight: dict[int, list]) -> RoundResult:
    n, rank = len(a.participants), a.participants.index(me)
    if n == 1:
        # The submission's buffer is the daemon's (a copy, or donated): the
        # mean of one is that buffer, without another copy of the model.
        return RoundResult(update)
    addr = {p.id: p.data for p in a.members}
    codec = None if cfg.codec is None else CodecSpec(cfg.codec, cfg.block_size)
    # Abortable from the loop while the links are still being set up: a wait
    # for a dial-back peer's link would otherwise outlast the round's abort
    # by a whole step timeout, the peer out of every round meanwhile.
    setup = _SetupAbort(links, [p for p in a.participants if p != me])
    inflight[a.round_id] = [setup]
    # Each link is opened when a transfer first needs it, in that transfer's
    # thread (direct.py); the loop's abort reaches them through
    # `setup` (PeerLinks.abort ends both a wait and a link in use).
    def opener(p: str, direction: str):
        def open_link():
            if direction == "send":
                return links.outgoing(p, addr[p], timeout=cfg.step_timeout)
            return links.incoming(p, timeout=cfg.step_timeout, address=addr[p])
        return lambda: _link(open_link, a.participants, p, direction)
    sends = [None if p == me else opener(p, "send") for p in a.participants]
    recvs = [None if p == me else opener(p, "recv") for p in a.participants]
    if cfg.aggregate == "mean" and _direct(update, n):
        return RoundResult(direct_allreduce(
            update, rank=rank, world=n, send_links=sends, recv_links=recvs,
            op_tag=a.round_id, average=True, codec=codec, timeout=cfg.step_timeout,
            abort_setup=setup.abort))
    succ, pred = a.participants[(rank + 1) % n], a.participants[(rank - 1) % n]
    send = _link(lambda: links.outgoing(succ, addr[succ], timeout=cfg.step_timeout),
                 a.participants, succ, "send")
    recv = _link(lambda: links.incoming(pred, timeout=cfg.step_timeout, address=addr[pred]),
                 a.participants, pred, "recv")
    inflight[a.round_id] = [setup, send, recv]
    if cfg.aggregate == "mean":
        in_place = update.numel() * 4 >= IN_PLACE_MIN_BYTES
        try:
            return RoundResult(ring_allreduce(
                update, rank=rank, world=n, send_link=send, recv_link=recv, op_tag=a.round_id,
                average=True, codec=codec, timeout=cfg.step_timeout, lanes=cfg.ring_lanes,
                out=update if in_place else None), spent=in_place)
        except AllReduceAborted as e:
            e.spent = in_place
            raise
    rows = ring_allgather(update, rank=rank, world=n, send_link=send, recv_link=recv,
                          op_tag=a.round_id, codec=codec, timeout=cfg.step_timeout)
    out = agg.aggregate(rows, cfg.aggregate)
    return RoundResult(out.value, tuple(a.participants[i] for i in out.refused))


class _SetupAbort:
    """abort(): ends a round's link setup and transfers with its peers (the
    loop's abort of an in-flight round calls it, as it calls Link.abort)."""

    def __init__(self, links: PeerLinks, peers: list[str]):
        self.links, self.peers = links, peers

    def abort(self) -> None:
        for p in self.peers:
            self.links.abort(p, CHANNEL_ROUND)


def _direct(update: torch.Tensor, n: int) -> bool:
    """Whether a mean among n runs as the direct all-reduce (two one-way
    hops) rather than the ring (2(n-1)): for a few peers and a small
    tensor, where the ring's hops, not the bytes, set its time. Every
    participant decides alike: the same n, numel and constants."""
    return 3 <= n <= DIRECT_MAX_WORLD and update.numel() * 4 <= DIRECT_MAX_BYTES


def _link(open_link, participants: tuple[str, ...], peer: str, direction: str):
    """open_link(), a TimeoutError tagged with the participant's rank it
    waited for and the link's direction (for stalled_neighbour)."""
    try:
        return open_link()
    except TimeoutError as e:
        e.peer_rank, e.direction = participants.index(peer), direction
        raise


def stalled_neighbour(e: BaseException, me: str, participants: tuple[str, ...]) -> str:
    """Whom a failed collective points at: the participant at the other end
    of the link on which a transfer (or the link's setup) timed out, else
    "" (a peer's abort reached us, a link broke, our own contribution was
    withdrawn). One failure aborts every link of the round within
    milliseconds, so only the participants linked to the one that stalled
    see a timeout. A ring's abort says the direction: the predecessor for a
    receive, the successor for a send."""
    cause = e.cause if isinstance(e, AllReduceAborted) else e
    if not isinstance(cause, TimeoutError) or me not in participants:
        return ""
    n, rank = len(participants), participants.index(me)
    peer = getattr(e, "peer_rank", None)
    if peer is not None and 0 <= peer < n and peer != rank:
        return participants[peer]
    direction = getattr(e, "direction", None)
    if direction == "recv":
        return participants[(rank - 1) % n]
    if direction == "send":
        return participants[(rank + 1) % n]
    return ""


def max_abs(t: torch.Tensor) -> float:
    """max |x| as a reduction (abs() would copy the tensor); NaN if any x is
    NaN, inf if any is infinite."""
    return float(torch.linalg.vector_norm(t, ord=float("inf"))) if t.numel() else 0.0


def poisoned_mean(mean: torch.Tensor, own_max: float | None) -> str | None:
    """Why a round's result must not be applied, or None: not finite, or
    larger than MEAN_GROWTH_LIMIT times this peer's own contribution (an
    honest mean is at most the largest contribution; one member's 1e30 would
    otherwise be applied, and every later round refused as non-finite:
    training over)."""
    # One pass for both checks (max_abs). own_max: this peer's contribution's,
    # taken before the round (an in-place ring writes over it).
    mean_max = max_abs(mean)
    if not math.isfinite(mean_max):
        return "is not finite"
    if own_max is not None:
        if own_max > 0 and mean_max > MEAN_GROWTH_LIMIT * own_max:
            return (f"is {mean_max / own_max:.3g} times larger than this peer's contribution "
                    f"(limit {MEAN_GROWTH_LIMIT:g})")
    return None
