"""Fault-tolerant ring all-reduce of a flat fp32 tensor.

The ring: peers ordered by rank 0..N-1; rank r sends to r+1 and receives from
r-1 (mod N) over striped `Link`s. The tensor is cut into N segments and the
classic two phases run, 2(N-1) steps in all:

    reduce-scatter, step s = 0..N-2:
        send   seg[(r - s) % N]      to the successor      (partial sum)
        recv   seg[(r - s - 1) % N]  from the predecessor, acc += incoming
    now rank r owns seg[(r + 1) % N], summed over all N peers
    finalise: (mean: divide by N); with a codec, encode it ONCE and adopt the
        decoded value, so the owner holds exactly what everybody else will
    all-gather, step s = 0..N-2:
        send   seg[(r + 1 - s) % N]  to the successor      (final, unchanged)
        recv   seg[(r - s) % N]      from the predecessor, overwrite

Pipelined by pieces: every segment is cut into the same P pieces, and each
(step, piece) is one transfer with its own op id. The receive side (a helper
thread) takes them in order; the send side starts piece p of step g as soon
as piece p of step g-1 has arrived, while later pieces of step g-1 are still
in flight. So no link idles at a step boundary waiting for the slowest
connection and the one-way delay (with 100 ms round trips that bubble, six
times per all-reduce of four peers, cost more than the codec saved). The
native transfers release the GIL, so both directions run at once.

Lanes: one transfer is striped over all of a link's connections and ends
when the slowest of them has delivered its share, so the next transfer's
first chunks wait for that straggler. With `lanes=k` the tensor is cut into k
parts, each all-reduced by the pipeline above over its own group of
connections (`Link.lanes`), all at once: a lagging connection holds up only
its own lane. (Measured on the emulated 100 ms / 1 Gbit/s path: one lane
per connection took the fp32 all-reduce from about 70 % to over 80 % of the
link-limited bound; docs/benchmarks.md.)

Invariants:
  * Out of place by default: the input is only read; the result is a new
    tensor (or `out`). In place only when asked (`out=tensor`).
  * All or nothing: a call returns a complete result or raises
    AllReduceAborted; there is no partially reduced return value.
  * Identical results: every segment's final value is computed at its owner
    alone and then copied byte for byte (raw fp32, or the owner's packed bytes
    forwarded unchanged and decoded by the same deterministic decoder), so
    every peer's result is bit-identical, quantized or not.
  * Frames of different all-reduces cannot be confused: see `op_id`.

Numerics: accumulation is in fp32. Without a codec the result is the fp32 sum
in ring order (error ~ N ulp). With a codec each reduce-scatter hop re-encodes
the partial sum (that error accumulates over N-1 hops), and the final value is
quantized once more by its owner.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import math
import threading
from dataclasses import dataclass
from collections.abc import Callable

import torch

from peerlearn import _native
from peerlearn.transport.stream import DEFAULT_CHUNK_ELEMS, Link
from peerlearn.wire import codecs

MAX_CHUNK_ELEMS = int(_native.MAX_CHUNK_ELEMS)

# op_id = op_tag << STEP_BITS | step * P + piece. The 2(N-1)P transfers of
# one all-reduce need < 2^16 values, tags get the other 48 bits; the map is
# injective, so two all-reduces with different tags (or two transfers of one)
# never share an op id on a link.
STEP_BITS = 16
MAX_OP_TAG = (1 << (64 - STEP_BITS)) - 1
MAX_WORLD = (1 << (STEP_BITS - 1))  # 2(N-1) steps must fit in STEP_BITS

# Segment boundaries are multiples of this (and of the codec block), so a
# codec's blocks never straddle two owners and raw copies stay cache aligned.
SEGMENT_ALIGN = 64

# Segments are cut into pieces of at most this many elements, moved one op
# each, so the next step can start on a piece while the rest of the step is
# still in flight (see the module docstring). 4 Mi elements: large enough
# that a piece is striped over every connection, small enough that a step of
# a 100M-element all-reduce is cut in several.
DEFAULT_PIECE_ELEMS = 1 << 22


class AllReduceAborted(PeerlearnError, RuntimeError):
    """The all-reduce did not complete; nothing was returned.

    phase: "reduce-scatter", "all-gather" or "finalise" ("contribute": this
    peer had nothing to send, its contribution withdrawn); step: the global step
    index (0 .. 2(N-1)-1); direction: "send" (link to the successor) or "recv"
    (link from the predecessor) or None; cause: the underlying exception.
    Both links are shut down: build a new ring before retrying.
    """

    def __init__(self, message: str, *, rank: int, phase: str, step: int,
                 direction: str | None, cause: BaseException | None):
        super().__init__(message)
        self.rank = rank
        self.phase = phase
        self.step = step
        self.direction = direction
        self.cause = cause
        # Set by a caller that reduced in place (swarm/collective.py): the
        # input now holds partial sums and cannot be offered again.
        self.spent = False


def op_id(op_tag: int, step: int) -> int:
    """The link-level op id of step `step` of all-reduce `op_tag` (documented above)."""
    if not 0 <= op_tag <= MAX_OP_TAG:
        raise ValueError(f"op_tag must be in [0, 2^{64 - STEP_BITS})")
    if not 0 <= step < (1 << STEP_BITS):
        raise ValueError("step out of range")
    return (op_tag << STEP_BITS) | step


def segment_bounds(numel: int, world: int, align: int) -> list[int]:
    """world+1 boundaries, each a multiple of align or numel; nearly equal parts.

    Every peer computes the same bounds from (numel, world, align); some
    segments may be empty when numel is small.
    """
    bounds = [0]
    for i in range(1, world):
        b = (numel * i // world + align - 1) // align * align
        bounds.append(min(max(b, bounds[-1]), numel))
    bounds.append(numel)
    return bounds


@dataclass(frozen=True)
class CodecSpec:
    """Which codec the all-reduce uses on the wire (peerlearn.wire.codecs ids)."""

    codec: int
    block_size: int = 64


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * 4 and b0 < a0 + a.numel() * 4


def piece_count(numel: int, world: int, piece_elems: int) -> int:
    """How many pieces each segment is cut into (the same at every peer).

    Enough that a piece is at most piece_elems, and few enough that every
    (step, piece) pair has its own op id.
    """
    if piece_elems < 1:
        raise ValueError("piece_elems must be positive")
    longest = -(-numel // world)
    wanted = max(1, -(-longest // piece_elems))
    return min(wanted, ((1 << STEP_BITS) - 1) // max(1, 2 * (world - 1)))


class _Pipeline:
    """One all-reduce's place in the ring: its links, its op ids, its progress.

    The receiver (a helper thread) works through (step, piece) in order and
    publishes how far it got; the sender (the caller's thread) waits only for
    the piece it needs next. Whichever side fails first records the cause and
    shuts both links down, so the other side and the neighbours fail at once.
    """

    def __init__(self, rank: int, send_link: Link, recv_link: Link, op_tag: int, pieces: int):
        self.rank = rank
        self.send_link, self.recv_link = send_link, recv_link
        self.op_tag = op_tag
        self.pieces = pieces
        self.received = 0  # (step, piece) pairs finished by the receiver, in order
        self.errors: list[tuple[str, int, str | None, BaseException]] = []  # first: the cause
        self.cv = threading.Condition()

    def op(self, step: int, piece: int) -> int:
        return op_id(self.op_tag, step * self.pieces + piece)

    def fail(self, phase: str, step: int, direction: str | None, cause: BaseException) -> None:
        with self.cv:
            self.errors.append((phase, step, direction, cause))
            self.cv.notify_all()
        # Wakes any transfer still running on the links (it fails at once) and
        # tells the peers at the other ends, which then abort too: one failure
        # spreads around the ring in milliseconds instead of one timeout per hop.
        self.send_link.abort()
        self.recv_link.abort()

    def mark_received(self) -> None:
        with self.cv:
            self.received += 1
            self.cv.notify_all()

    def wait_received(self, step: int, piece: int) -> bool:
        """Blocks until (step, piece) has arrived; False if the all-reduce failed."""
        index = step * self.pieces + piece
        with self.cv:
            self.cv.wait_for(lambda: self.received > index or self.errors)
            return not self.errors

    def aborted(self) -> AllReduceAborted:
        phase, step, direction, cause = self.errors[0]
        where = f"{phase} step {step}" + (f" on the {direction} link" if direction else "")
        return AllReduceAborted(
            f"rank {self.rank}: {where} failed: {type(cause).__name__}: {cause}", rank=self.rank,
            phase=phase, step=step, direction=direction, cause=cause)


def ring_allreduce(
    tensor: torch.Tensor,
    *,
    rank: int,
    world: int,
    send_link: Link | None,
    recv_link: Link | None,
    op_tag: int,
    average: bool = True,
    codec: CodecSpec | None = None,
    timeout: float = 60.0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    piece_elems: int = DEFAULT_PIECE_ELEMS,
    lanes: int = 1,
    on_step: Callable[[int], None] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns the sum (average=False) or mean of `tensor` over the ring.

    tensor: contiguous fp32 on CPU, the same numel at every peer.
    send_link goes to rank (rank+1) % world, recv_link comes from
    (rank-1) % world; both None when world == 1. op_tag (< 2^48) must be the
    same at every peer and differ between all-reduces sharing links, and so
    must piece_elems (it decides how the op ids are laid out).
    timeout: seconds any one transfer (one piece of one step) may take.
    lanes: the tensor is cut into this many parts, each all-reduced at the
    same time over its own group of each link's connections (Link.lanes),
    so a connection that falls behind stalls only its lane's pipeline; the
    same at every peer, at most either link's connection count.
    on_step(step) is called as the sender starts each step (tests inject
    faults there; with lanes, only lane 0 calls it).
    out: an fp32 tensor of the same numel to hold the result (reusing one
    saves a fresh allocation's page faults per call); by default a new
    tensor. `out=tensor` reduces in place (as torch.distributed does) and
    saves a copy of the input; any other overlap is refused. On failure
    out's content is unspecified.

    Raises AllReduceAborted on any failure, after shutting both links down;
    `tensor` is never modified unless it is `out`.
    """
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise TypeError("ring_allreduce reduces fp32 CPU tensors")
    if not tensor.is_contiguous():
        raise ValueError("ring_allreduce needs a contiguous tensor")
    if not 1 <= world <= MAX_WORLD or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world <= {MAX_WORLD}")
    op_id(op_tag, 0)  # validates the tag before anything moves
    if piece_elems < 1:
        raise ValueError("piece_elems must be positive")
    if out is None:
        out = torch.empty_like(tensor)
    elif (out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != tensor.numel()
          or (_overlaps(out, tensor) and out.data_ptr() != tensor.data_ptr())):
        raise ValueError("out must be a contiguous fp32 tensor of tensor's size, apart from it "
                         "or tensor itself")
    in_place = out.data_ptr() == tensor.data_ptr()
    out = out.view(-1)
    if not in_place:
        out.copy_(tensor.view(-1))  # the only tensor this call writes
    if world == 1:
        return out.view_as(tensor)
    if send_link is None or recv_link is None:
        raise ValueError("a ring of more than one peer needs both links")
    align = SEGMENT_ALIGN if codec is None else math.lcm(SEGMENT_ALIGN, codec.block_size)
    args = dict(rank=rank, world=world, op_tag=op_tag, average=average, codec=codec,
                timeout=timeout, chunk_elems=chunk_elems, piece_elems=piece_elems, align=align)
    errors: list[AllReduceAborted] = []

    def fail(what: str, e: BaseException) -> None:
        errors.append(e if isinstance(e, AllReduceAborted) else AllReduceAborted(
            f"rank {rank}: {what}: {type(e).__name__}: {e}", rank=rank, phase="setup", step=0,
            direction=None, cause=e))
        send_link.abort()  # every lane and both neighbours fail at once
        recv_link.abort()

    def lane(i: int, send: Link, recv: Link, part: torch.Tensor) -> None:
        try:
            _ring_pipeline(part, send_link=send, recv_link=recv,
                           on_step=on_step if i == 0 else None, **args)
        except BaseException as e:  # noqa: BLE001 - any lane failing fails the whole call
            fail(f"lane {i} failed", e)

    if lanes == 1:
        lane(0, send_link, recv_link, out)
    else:
        threads: list[threading.Thread] = []
        try:
            # A neighbour with fewer connections than lanes is a ring mismatch:
            # fail the all-reduce (and the neighbours), as any other.
            cut = segment_bounds(out.numel(), lanes, align)
            parts = zip(send_link.lanes(lanes), recv_link.lanes(lanes),
                        (out[cut[i]:cut[i + 1]] for i in range(lanes)))
            for i, (send, recv, part) in enumerate(parts):
                threads.append(threading.Thread(target=lane, args=(i, send, recv, part),
                                                name=f"allreduce-lane-{i}"))
                threads[-1].start()
        except BaseException as e:  # noqa: BLE001 - e.g. lanes > connections, no thread
            fail("could not start the lanes", e)
        finally:
            for t in threads:
                t.join()  # never leave a thread writing into our buffers
    if errors:
        raise errors[0]
    return out.view_as(tensor)


def _ring_pipeline(out: torch.Tensor, *, rank: int, world: int, send_link: Link,
                   recv_link: Link, op_tag: int, average: bool, codec: CodecSpec | None,
                   timeout: float, chunk_elems: int, piece_elems: int, align: int,
                   on_step: Callable[[int], None] | None) -> None:
    """All-reduces the flat fp32 `out` in place over one pair of links (see
    the module docstring); raises AllReduceAborted after shutting both down."""
    chunk = max(align, chunk_elems // align * align)  # chunks never cut a codec block
    byte_chunk = min(chunk * 4, MAX_CHUNK_ELEMS)  # packed frames as large as raw ones
    n_pieces = piece_count(out.numel(), world, piece_elems)
    seg_bounds = segment_bounds(out.numel(), world, align)
    # piece p of segment i: the same cut at every peer, aligned like segments
    cuts = [[seg_bounds[i] + b for b in
             segment_bounds(seg_bounds[i + 1] - seg_bounds[i], n_pieces, align)]
            for i in range(world)]
    pipe = _Pipeline(rank, send_link, recv_link, op_tag, n_pieces)
    n_steps = 2 * (world - 1)
    own = (rank + 1) % world  # the segment this rank finalises
    packed: dict[tuple[int, int], torch.Tensor] = {}  # (segment, piece) -> owner's bytes

    def piece(i: int, p: int) -> torch.Tensor:
        return out[cuts[i][p]:cuts[i][p + 1]]

    def phase_of(step: int) -> str:
        return "reduce-scatter" if step < world - 1 else "all-gather"

    # Which segment moves in global step g, seen from this rank:
    #   reduce-scatter g = 0..N-2: send (r - g), receive (r - g - 1) and add
    #   all-gather g = N-1..2N-3:  send (r + 1 - s), receive (r - s), s = g - (N-1)
    def sent_segment(g: int) -> int:
        return (rank - g) % world if g < world - 1 else (rank + 1 - (g - world + 1)) % world

    def received_segment(g: int) -> int:
        return (rank - g - 1) % world if g < world - 1 else (rank - (g - world + 1)) % world

    def finalise(p: int) -> None:
        t = piece(own, p)
        if average:
            t.div_(world)
        if codec is not None and t.numel():
            # Quantize once and adopt the dequantized value: the owner must end
            # with exactly what everybody else decodes from these bytes.
            packed[own, p] = codecs.encode(t, codec.codec, block_size=codec.block_size)
            codecs.decode(packed[own, p], out=t)

    def receive_all() -> None:
        for g in range(n_steps):
            i = received_segment(g)
            for p in range(n_pieces):
                t = piece(i, p)
                try:
                    if not t.numel():  # both ends know every piece's size: both skip it
                        pass
                    elif g < world - 1:
                        recv_link.recv_into(t, pipe.op(g, p), accumulate=True, timeout=timeout)
                    elif codec is None:
                        recv_link.recv_into(t, pipe.op(g, p), timeout=timeout)
                    else:
                        size = codecs.packed_size(t.numel(), codec.codec, torch.float32,
                                                  codec.block_size)
                        packed[i, p] = buf = torch.empty(size, dtype=torch.uint8)
                        recv_link.recv_into(buf, pipe.op(g, p), timeout=timeout)
                        # the next step forwards these bytes, not the decoded ones
                        codecs.decode(buf, out=t)
                except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
                    pipe.fail(phase_of(g), g, "recv", e)
                    return
                if g == world - 2:
                    try:
                        finalise(p)
                    except BaseException as e:  # noqa: BLE001 - e.g. a sum the codec refuses
                        pipe.fail("finalise", g + 1, None, e)
                        return
                pipe.mark_received()

    def send(g: int, p: int) -> None:
        i = sent_segment(g)
        t = piece(i, p)
        if not t.numel():
            return
        if g < world - 1:
            send_link.send(t, pipe.op(g, p), codec=None if codec is None else codec.codec,
                           block_size=64 if codec is None else codec.block_size,
                           chunk_elems=chunk, timeout=timeout)
        elif codec is None:
            send_link.send(t, pipe.op(g, p), chunk_elems=chunk, timeout=timeout)
        else:
            send_link.send(packed[i, p], pipe.op(g, p), chunk_elems=byte_chunk, timeout=timeout)

    receiver = threading.Thread(target=receive_all, name=f"allreduce-recv-{op_tag}")
    try:
        receiver.start()
    except BaseException as e:  # noqa: BLE001 - no thread: nothing runs, tell the neighbours
        pipe.fail("setup", 0, None, e)
        err = pipe.aborted()
        raise err from e
    g = 0
    try:
        for g in range(n_steps):
            for p in range(n_pieces):
                # step g forwards what step g-1 brought in (or its finalised sum)
                if g and not pipe.wait_received(g - 1, p):
                    break
                if p == 0 and on_step is not None:
                    on_step(g)
                send(g, p)
            if pipe.errors:
                break
    except BaseException as e:  # noqa: BLE001 - re-raised below as AllReduceAborted
        pipe.fail(phase_of(g), g, "send", e)  # a Ctrl-C in a wait too: nobody is left waiting
    finally:
        receiver.join()  # never leave a thread writing into our buffers
    if pipe.errors:
        err = pipe.aborted()
        raise err from err.cause
