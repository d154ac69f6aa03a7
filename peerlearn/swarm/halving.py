"""Recursive halving and doubling all-reduce: 2 log2 N steps, not 2(N - 1).

After Thakur, Rabenseifner and Gropp, "Optimization of Collective
Communication Operations in MPICH" (IJHPCA 2005), Rabenseifner's algorithm:
a reduce-scatter by recursive halving, then an all-gather by recursive
doubling, with the ranks beyond the largest power of two p <= N folded in
first and unfolded last. Each step is one exchange with one partner, so a
round among 32 peers takes 10 one-way hops where the ring takes 62 (each at
least one link delay: what sets a small tensor's round over a WAN), for the
ring's bytes: 2(p - 1)/p of the tensor each way per core rank, plus one
whole tensor each way between a folded rank and its partner.

    fold      rank r >= p:  send x to r - p          (op step 0)
              rank r < N-p: x += what r + p sent
    halving   for d = p/2, p/4, ..., 1: partner = r ^ d
              keep the half of my range on my side of bit d, send the other
              half, add the partner's copy of mine       (op steps 1..L)
              -> rank r holds segment r, summed over every rank; / N
    doubling  for d = 1, 2, ..., p/2: send my range, receive the partner's
              next to it                                (op steps L+1..2L)
    unfold    rank r < N-p: send the result to r + p     (op step 2L+1)

Invariants, as the ring's:
  * All or nothing: the result, or AllReduceAborted after every link this
    call opened was aborted (its partners then fail at once too).
  * Identical results: each segment's final bits are made once, by its
    owner, and copied; the sums along the way are a fixed binary tree
    (x + y is the same bits as y + x), so they do not depend on timing and
    a rerun gives the same bits.
  * `tensor` is only read.
No codec and no pipelining across steps: meant for the small tensors of
swarms past direct.py's DIRECT_MAX_WORLD, where the ring's hops, not its
bytes, set the time. Not taken by collective.py yet (docs/swarm.md,
"Rounds past 8 peers": a daemon test under CI load comes first).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from peerlearn.swarm.allreduce import SEGMENT_ALIGN, AllReduceAborted, op_id, segment_bounds
from peerlearn.swarm.direct import _Failures
from peerlearn.transport.stream import DEFAULT_CHUNK_ELEMS, Link, StreamProtocolError

LinkOrOpener = Link | Callable[[], Link] | None


def halving_allreduce(
    tensor: torch.Tensor,
    *,
    rank: int,
    world: int,
    send_links: list[LinkOrOpener],
    recv_links: list[LinkOrOpener],
    op_tag: int,
    average: bool = True,
    timeout: float = 60.0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    abort_setup: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The sum (average=False) or mean of `tensor` (contiguous fp32, CPU,
    the same numel everywhere) over world peers, in a new tensor.

    send_links[j] / recv_links[j]: the link to / from rank j, or a function
    opening it (called when a step first needs that partner); only the
    partners the schedule names are used (`partners`). op_tag, timeout and
    abort_setup as for direct_allreduce. Raises AllReduceAborted, with
    `peer_rank` the partner of the step that failed first.
    """
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise TypeError("halving_allreduce reduces fp32 CPU tensors")
    if not tensor.is_contiguous():
        raise ValueError("halving_allreduce needs a contiguous tensor")
    if not 0 <= rank < world or len(send_links) != world or len(recv_links) != world:
        raise ValueError("need 0 <= rank < world and one link slot per rank")
    p, levels = _core(world)
    op_id(op_tag, 2 * levels + 1)  # validates the tag before anything moves
    work = tensor.detach().reshape(-1).clone()
    if world == 1:
        return work.view_as(tensor)
    failures = _Failures(rank, abort_setup)
    links: dict[tuple[int, str], Link] = {}

    def link(j: int, direction: str) -> Link:
        key = (j, direction)
        if key not in links:
            given = (send_links if direction == "send" else recv_links)[j]
            if given is None:
                raise ValueError(f"no {direction} link for rank {j}, which the schedule needs")
            opened = given if isinstance(given, Link) else given()
            failures.opened(opened)
            links[key] = opened
        return links[key]

    def receive(j: int, into: torch.Tensor, op: int) -> None:
        """into <- op from j. A link from j can still hold an aborted round's
        frames (j sent them after we had given that round up): reading one
        breaks that link (StreamProtocolError), and when the slot is an
        opener the receive moves to j's next link, as PeerLinks.recv_into
        does for the ring, until the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            current = link(j, "recv")
            try:
                current.recv_into(into, op, timeout=max(0.1, deadline - time.monotonic()))
                return
            except StreamProtocolError:
                if isinstance(recv_links[j], Link) or time.monotonic() >= deadline:
                    raise
                links.pop((j, "recv"), None)  # the next opening returns j's newer link

    def exchange(step: int, phase: str, partner: int, out: torch.Tensor | None,
                 into: torch.Tensor | None) -> None:
        """Sends `out` to partner while receiving its part into `into`."""
        errors: list[tuple[str, BaseException]] = []

        def send() -> None:
            try:
                link(partner, "send").send(out, op_id(op_tag, step), chunk_elems=chunk_elems,
                                           timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(("send", e))
                failures.fail(phase, step, "send", partner, e)

        sender = threading.Thread(target=send, name=f"halving-send-{partner}") \
            if out is not None and out.numel() else None
        if sender is not None:
            sender.start()
        try:
            if into is not None and into.numel():
                receive(partner, into, op_id(op_tag, step))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(("recv", e))
            failures.fail(phase, step, "recv", partner, e)
        finally:
            if sender is not None:
                sender.join()  # never leave a thread reading our buffer
        if errors:
            raise _Stop

    bounds = segment_bounds(work.numel(), p, SEGMENT_ALIGN)

    def span(lo: int, hi: int) -> torch.Tensor:
        return work[bounds[lo]:bounds[hi]]

    try:
        if rank >= p:  # folded: the partner reduces for us and sends the result
            exchange(0, "fold", rank - p, work, None)
            exchange(2 * levels + 1, "unfold", rank - p, None, work)
            return work.view_as(tensor)
        if rank < world - p:
            theirs = torch.empty_like(work)
            exchange(0, "fold", rank + p, None, theirs)
            work.add_(theirs)
            del theirs
        lo, hi = 0, p
        for s in range(levels):  # halving: the far half first
            d = p >> (s + 1)
            mid = lo + (hi - lo) // 2
            keep, give = ((lo, mid), (mid, hi)) if not rank & d else ((mid, hi), (lo, mid))
            theirs = torch.empty_like(span(*keep))
            exchange(1 + s, "reduce-scatter", rank ^ d, span(*give), theirs)
            span(*keep).add_(theirs)
            lo, hi = keep
        if average:
            span(lo, hi).div_(world)
        for s in reversed(range(levels)):  # doubling: the near half first
            d = p >> (s + 1)
            size = hi - lo
            other = (lo + size, hi + size) if not rank & d else (lo - size, lo)
            exchange(2 * levels - s, "all-gather", rank ^ d, span(lo, hi), span(*other))
            lo, hi = min(lo, other[0]), max(hi, other[1])
        if rank < world - p:
            exchange(2 * levels + 1, "unfold", rank + p, work, None)
    except _Stop:
        pass
    except BaseException as e:  # noqa: BLE001 - e.g. a bad link slot: one exception tree
        failures.fail("setup", 0, "none", rank, e)
    if failures.errors:
        err = failures.aborted()
        raise err from err.cause
    return work.view_as(tensor)


class _Stop(Exception):
    """A step failed and was recorded: stop the schedule."""


def _core(world: int) -> tuple[int, int]:
    """(p, log2 p): the largest power of two at most world."""
    if world < 1:
        raise ValueError("world must be at least 1")
    p = 1 << (world.bit_length() - 1)
    return p, p.bit_length() - 1


def partners(rank: int, world: int) -> list[int]:
    """The ranks `rank` exchanges with, in schedule order (each once)."""
    p, levels = _core(world)
    if rank >= p:
        return [rank - p]
    out = [rank + p] if rank < world - p else []
    return out + [rank ^ (p >> (s + 1)) for s in range(levels)]


__all__ = ["halving_allreduce", "partners", "AllReduceAborted"]
