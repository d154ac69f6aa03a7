"""Direct all-reduce: two one-way hops instead of the ring's 2(N-1).

A ring moves a tensor in 2(N-1) sequential steps, each at least one one-way
delay: over the emulated 100 ms path a 1 MB all-reduce among 4 peers took 7
round trips (docs/benchmarks.md), while its bytes take a fifth of one. Here
every peer sends each other peer that peer's segment of its contribution at
once; each owner sums its segment and sends the result to every other peer at
once. Each peer sends (and receives) 2(N-1)/N of the tensor, exactly the
ring's bytes, over N-1 links at the same time instead of one: the same
bandwidth term when the bottleneck is each peer's own access link, and two
one-way delays in place of 2(N-1).

    scatter, for every j != r:  send seg[j] of my tensor to j      (op step 0)
                                receive j's seg[r] into part[j]
    reduce:  seg[r] = part[0] + part[1] + ... + part[N-1], in rank order
             (part[r] is mine); mean: / N; with a codec, encode once and
             adopt the decoded value
    gather,  for every j != r:  send seg[r] (or its packed bytes) to j (op step 1)
                                receive seg[j] from j, overwrite

What it costs: N-1 links in each direction (the ring needs one), and
receive buffers for N-1 parts, (N-1)/N of the tensor; so it is meant for
small tensors among few peers (collective.py chooses; DIRECT_MAX_*).

Invariants, as ring_allreduce's:
  * All or nothing: a complete result, or AllReduceAborted after every link
    was aborted (so every other participant fails at once too).
  * Identical results: each segment's final bytes are made once, by its
    owner, and copied; and they do not depend on arrival order (the owner
    adds the parts in rank order), so a rerun gives the same bits.
  * `tensor` is only read, unless it is `out`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from peerlearn.swarm.allreduce import (
    MAX_CHUNK_ELEMS, SEGMENT_ALIGN, AllReduceAborted, CodecSpec, _overlaps, op_id,
    segment_bounds)
from peerlearn.transport.stream import DEFAULT_CHUNK_ELEMS, Link
from peerlearn.wire import codecs

# collective.py runs a mean this way when the round has at most this many
# participants and the tensor at most this many bytes; larger ones take the
# ring (its pipelining and lanes, one link each way, no part buffers).
DIRECT_MAX_WORLD = 8
DIRECT_MAX_BYTES = 64 << 20
# Parts up to this size ride one connection of each link, always the same:
# its receive window, grown by the kernel's autotuning while it carries them,
# stays grown. Spread over four connections, 1 MiB among 4 peers put 64 KiB
# on each, exactly the window of a connection that never carried more, and
# the transfer's last bytes (its frame headers) waited for the window to
# open: 1 to 3 round trips in most rounds over the emulated 100 ms path
# (docs/benchmarks.md, "Receive windows"). Larger parts use every
# connection, where the bandwidth is.
ONE_CONNECTION_BYTES = 1 << 20


def _first_lane(link: Link | None) -> Link | None:
    """The link's first connection alone (both ends number them alike)."""
    return None if link is None else link.lanes(link.n_conns)[0]


class _Failures:
    """The first failure wins; recording one aborts every link at once, those
    opened later too, and the setups still waiting (abort_setup)."""

    def __init__(self, rank: int, abort_setup: Callable[[], None] | None):
        self.rank = rank
        self.links: list[Link] = []
        self.abort_setup = abort_setup
        self.errors: list[tuple[str, int, str, int, BaseException]] = []
        self.lock = threading.Lock()

    def opened(self, link: Link) -> None:
        with self.lock:
            self.links.append(link)
            failed = bool(self.errors)
        if failed:
            link.abort()

    def fail(self, phase: str, step: int, direction: str, peer: int,
             cause: BaseException) -> None:
        with self.lock:
            self.errors.append((phase, step, direction, peer, cause))
            links = list(self.links)
        for link in links:
            link.abort()
        if self.abort_setup is not None:
            self.abort_setup()

    def aborted(self) -> AllReduceAborted:
        phase, step, direction, peer, cause = self.errors[0]
        e = AllReduceAborted(
            f"rank {self.rank}: {phase} with rank {peer} ({direction}) failed: "
            f"{type(cause).__name__}: {cause}", rank=self.rank, phase=phase, step=step,
            direction=direction, cause=cause)
        e.peer_rank = peer  # whom a timeout points at (collective.stalled_neighbour)
        return e


def direct_allreduce(
    tensor: torch.Tensor,
    *,
    rank: int,
    world: int,
    send_links: list[Link | Callable[[], Link] | None],
    recv_links: list[Link | Callable[[], Link] | None],
    op_tag: int,
    average: bool = True,
    codec: CodecSpec | None = None,
    timeout: float = 60.0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    out: torch.Tensor | None = None,
    abort_setup: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The sum (average=False) or mean of `tensor` over world peers.

    tensor: contiguous fp32 on CPU, the same numel at every peer.
    send_links[j] goes to rank j, recv_links[j] comes from rank j (None at
    j == rank), or a function opening it, called in that transfer's own
    thread: one peer slow to connect then holds up only its own transfers,
    and a peer that never connects is the one the timeouts name (opened in
    turn before any send, a third peer waiting for our link timed out on
    us instead). abort_setup: ends the openings still waiting, called on
    the first failure. op_tag as for ring_allreduce (the same at every peer,
    new for every all-reduce sharing these links). timeout: seconds any one
    transfer may take. out: as for ring_allreduce (`out=tensor` in place).
    Raises AllReduceAborted (with `peer_rank`, the other end of the link
    that failed first) after aborting every link.
    """
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise TypeError("direct_allreduce reduces fp32 CPU tensors")
    if not tensor.is_contiguous():
        raise ValueError("direct_allreduce needs a contiguous tensor")
    if not 0 <= rank < world or len(send_links) != world or len(recv_links) != world:
        raise ValueError("need 0 <= rank < world and one link slot per rank")
    op_id(op_tag, 1)  # validates the tag before anything moves
    if out is None:
        out = torch.empty_like(tensor)
    elif (out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != tensor.numel()
          or (_overlaps(out, tensor) and out.data_ptr() != tensor.data_ptr())):
        raise ValueError("out must be a contiguous fp32 tensor of tensor's size, apart from it "
                         "or tensor itself")
    flat_in, flat = tensor.view(-1), out.view(-1)
    if world == 1:  # the sum and the mean of one
        if flat.data_ptr() != flat_in.data_ptr():
            flat.copy_(flat_in)
        return out.view_as(tensor)
    others = [j for j in range(world) if j != rank]
    if any(send_links[j] is None or recv_links[j] is None for j in others):
        raise ValueError("a direct all-reduce needs a link to and from every other peer")
    given = [x for x in send_links + recv_links if isinstance(x, Link)]
    align = SEGMENT_ALIGN if codec is None else math.lcm(SEGMENT_ALIGN, codec.block_size)
    bounds = segment_bounds(flat.numel(), world, align)
    chunk = max(align, chunk_elems // align * align)
    byte_chunk = min(chunk * 4, MAX_CHUNK_ELEMS)

    def seg(t: torch.Tensor, i: int) -> torch.Tensor:
        return t[bounds[i]:bounds[i + 1]]

    mine = seg(flat, rank)
    # Sends read the input, never `out`: with out=tensor the gather overwrites
    # the other segments only after every scatter send has finished.
    parts = {j: torch.empty_like(mine) for j in others}
    failures = _Failures(rank, abort_setup)  # the whole links: an abort ends every lane
    for link in given:
        failures.opened(link)
    seg_max = max(bounds[i + 1] - bounds[i] for i in range(world))
    one_lane = seg_max * 4 <= ONE_CONNECTION_BYTES

    def opened(link: Link | Callable[[], Link]) -> Link:
        if not isinstance(link, Link):
            link = link()
            failures.opened(link)
        return _first_lane(link) if one_lane else link
    scattered = threading.Barrier(len(others) + 1)  # every scatter send done
    # In place, seg j of `out` is what the scatter sends to j: j's gather
    # may land there only once that send has read it.
    sent_to = {j: threading.Event() for j in others}
    arrived: set[int] = set()  # whose scatter part is here (set.add is atomic)
    received = threading.Semaphore(0)
    reduced = threading.Event()
    packed: list[torch.Tensor] = []  # the owner's bytes, with a codec

    def give_up() -> None:
        """After a failure: no thread waits for another step."""
        scattered.abort()
        reduced.set()
        for ev in sent_to.values():
            ev.set()

    def sender(j: int) -> None:
        step = 0
        try:
            link = opened(send_links[j])
            t = seg(flat_in, j)
            if t.numel():
                link.send(t, op_id(op_tag, 0), codec=None if codec is None else codec.codec,
                          block_size=64 if codec is None else codec.block_size,
                          chunk_elems=chunk, timeout=timeout)
            sent_to[j].set()
            scattered.wait()
            step = 1
            reduced.wait()
            if failures.errors or not mine.numel():
                return
            if codec is None:
                link.send(mine, op_id(op_tag, 1), chunk_elems=chunk, timeout=timeout)
            else:
                link.send(packed[0], op_id(op_tag, 1), chunk_elems=byte_chunk,
                          timeout=timeout)
        except threading.BrokenBarrierError:
            return
        except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
            failures.fail("scatter" if step == 0 else "gather", step, "send", j, e)
            give_up()

    def receiver(j: int) -> None:
        step = 0
        try:
            link = opened(recv_links[j])
            if parts[j].numel():
                link.recv_into(parts[j], op_id(op_tag, 0), timeout=timeout)
            arrived.add(j)
            received.release()
            step = 1
            t = seg(flat, j)
            # Read j's gather as soon as it comes, not after our own reduce:
            # unread, it filled the connection's receive window (64 KiB on
            # one that carried little) and j's send waited a round trip
            # for the window to open again.
            if flat.data_ptr() == flat_in.data_ptr():
                sent_to[j].wait()  # also set by any failure
            if failures.errors or not t.numel():
                return
            if codec is None:
                link.recv_into(t, op_id(op_tag, 1), timeout=timeout)
            else:
                size = codecs.packed_size(t.numel(), codec.codec, torch.float32,
                                          codec.block_size)
                buf = torch.empty(size, dtype=torch.uint8)
                link.recv_into(buf, op_id(op_tag, 1), timeout=timeout)
                codecs.decode(buf, out=t)
        except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
            missing = [k for k in others if k not in arrived]
            if step == 1 and missing:
                # Our own scatter is incomplete: j's gather failed (it timed
                # out, or j aborted) because j could not reduce either; the
                # one whose part never came is at the other end of it.
                failures.fail("scatter", 0, "recv", missing[0], e)
            else:
                failures.fail("scatter" if step == 0 else "gather", step, "recv", j, e)
            received.release()
            give_up()

    threads = [threading.Thread(target=fn, args=(j,), name=f"direct-{fn.__name__}-{j}")
               for j in others for fn in (sender, receiver)]
    try:
        for t in threads:
            t.start()
        for _ in others:
            received.acquire()
        if not failures.errors:
            scattered.wait()  # out may be the input: keep it until every send read it
            _reduce(mine, seg(flat_in, rank), parts, rank, world, average, codec, packed)
    except threading.BrokenBarrierError:
        pass  # a sender failed: recorded
    except BaseException as e:  # noqa: BLE001 - e.g. a sum the codec refuses, no thread
        failures.fail("reduce", 1, "none", rank, e)
    finally:
        if failures.errors:
            give_up()  # senders waiting for the others' scatter give up
        reduced.set()
        for t in threads:
            if t.ident is not None:
                t.join()  # never leave a thread writing into our buffers
    if failures.errors:
        err = failures.aborted()
        raise err from err.cause
    return out.view_as(tensor)


def _reduce(mine: torch.Tensor, own_input: torch.Tensor, parts: dict[int, torch.Tensor],
            rank: int, world: int, average: bool, codec: CodecSpec | None,
            packed: list[torch.Tensor]) -> None:
    """mine = the rank-ordered sum of the parts and my own input's segment
    (then the mean, then the codec's round trip); packed gets the bytes the
    gather sends when there is a codec."""
    if not mine.numel():
        return
    if own_input.data_ptr() == mine.data_ptr() and rank != 0:
        own_input = own_input.clone()  # in place: mine is overwritten by part[0] first
    terms = [own_input if j == rank else parts[j] for j in range(world)]
    if mine.data_ptr() != terms[0].data_ptr():
        mine.copy_(terms[0])
    for t in terms[1:]:
        mine.add_(t)
    if average:
        mine.div_(world)
    if codec is not None:
        packed.append(codecs.encode(mine, codec.codec, block_size=codec.block_size))
        codecs.decode(packed[0], out=mine)
