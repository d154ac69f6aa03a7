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

In every step the send and the receive run at the same time (the receive on a
helper thread; the native transfers release the GIL), so each link carries
traffic in both phases without waiting on the other direction.

Invariants:
  * Out of place: the input is only read; the result is a new tensor.
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

import math
import threading
from dataclasses import dataclass
from collections.abc import Callable

import torch

from peerlearn import _native
from peerlearn.transport.stream import DEFAULT_CHUNK_ELEMS, Link
from peerlearn.wire import codecs

MAX_CHUNK_ELEMS = int(_native.MAX_CHUNK_ELEMS)

# op_id = op_tag << STEP_BITS | step. Steps need 2(N-1) < 2^16 values, tags
# get the other 48 bits; the map is injective, so two all-reduces with
# different tags (or two steps of one) never share an op id on a link.
STEP_BITS = 16
MAX_OP_TAG = (1 << (64 - STEP_BITS)) - 1
MAX_WORLD = (1 << (STEP_BITS - 1))  # 2(N-1) steps must fit in STEP_BITS

# Segment boundaries are multiples of this (and of the codec block), so a
# codec's blocks never straddle two owners and raw copies stay cache aligned.
SEGMENT_ALIGN = 64


class AllReduceAborted(RuntimeError):
    """The all-reduce did not complete; nothing was returned.

    phase: "reduce-scatter", "all-gather" or "finalise"; step: the global step
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


class _Codec:
    """The three codec calls the ring needs."""

    def __init__(self, spec: CodecSpec):
        self.spec = spec

    def packed_size(self, numel: int) -> int:
        return codecs.packed_size(numel, self.spec.codec, torch.float32, self.spec.block_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return codecs.encode(x, self.spec.codec, block_size=self.spec.block_size)

    def decode_into(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        codecs.decode(packed, out=out)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * 4 and b0 < a0 + a.numel() * 4


def _shutdown(link: Link) -> None:
    # Wakes any transfer still running on the link (it fails at once) and
    # tells the peer at the other end, which then aborts too: one failure
    # spreads around the ring in milliseconds instead of one timeout per hop.
    link.abort()


class _Ring:
    """One all-reduce's place in the ring: its links, its tag, its limits."""

    def __init__(self, rank: int, send_link: Link, recv_link: Link, op_tag: int,
                 on_step: Callable[[int], None] | None):
        self.rank = rank
        self.send_link, self.recv_link = send_link, recv_link
        self.op_tag = op_tag
        self.on_step = on_step

    def abort(self, message: str, phase: str, step: int, direction: str | None,
              cause: BaseException | None) -> AllReduceAborted:
        _shutdown(self.send_link)
        _shutdown(self.recv_link)
        return AllReduceAborted(
            f"rank {self.rank}: {message}", rank=self.rank, phase=phase, step=step,
            direction=direction, cause=cause)

    def step(self, index: int, phase: str, send: Callable[[int], None],
             recv: Callable[[int], None]) -> None:
        """Runs send(op_id) on this thread and recv(op_id) on a helper, both to the end.

        If either fails, both links are shut down (so the other transfer and
        the neighbours fail fast) and AllReduceAborted names the first failure.
        """
        if self.on_step is not None:
            self.on_step(index)
        op = op_id(self.op_tag, index)
        errors: list[tuple[str, BaseException]] = []  # first entry: the root cause

        def guarded(direction: str, fn: Callable[[int], None]) -> None:
            try:
                fn(op)
            except BaseException as e:  # noqa: BLE001 - reported by the owner below
                errors.append((direction, e))
                _shutdown(self.send_link)
                _shutdown(self.recv_link)

        receiver = threading.Thread(target=guarded, args=("recv", recv),
                                    name=f"allreduce-recv-{index}")
        receiver.start()
        try:
            guarded("send", send)
        finally:
            receiver.join()  # never leave a thread writing into our buffers
        if errors:
            direction, cause = errors[0]
            raise self.abort(
                f"{phase} step {index} failed on the {direction} link: "
                f"{type(cause).__name__}: {cause}", phase, index, direction, cause,
            ) from cause


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
    on_step: Callable[[int], None] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns the sum (average=False) or mean of `tensor` over the ring.

    tensor: contiguous fp32 on CPU, the same numel at every peer.
    send_link goes to rank (rank+1) % world, recv_link comes from
    (rank-1) % world; both None when world == 1. op_tag (< 2^48) must be the
    same at every peer and differ between all-reduces sharing links.
    timeout: seconds any one step (one segment each way) may take.
    on_step(step) is called before each step (tests inject faults there).
    out: an fp32 tensor of the same numel, not overlapping `tensor`, to hold
    the result (reusing one saves a fresh allocation's page faults per call);
    by default a new tensor. On failure its content is unspecified.

    Raises AllReduceAborted on any failure, after shutting both links down;
    `tensor` is never modified.
    """
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise TypeError("ring_allreduce reduces fp32 CPU tensors")
    if not tensor.is_contiguous():
        raise ValueError("ring_allreduce needs a contiguous tensor")
    if not 1 <= world <= MAX_WORLD or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world <= {MAX_WORLD}")
    op_id(op_tag, 0)  # validates the tag before anything moves
    if out is None:
        out = torch.empty_like(tensor)
    elif (out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != tensor.numel()
          or _overlaps(out, tensor)):
        raise ValueError("out must be a contiguous fp32 tensor of tensor's size, apart from it")
    out = out.view(-1)
    out.copy_(tensor.view(-1))  # the only tensor this call writes
    if world == 1:
        return out.view_as(tensor)
    if send_link is None or recv_link is None:
        raise ValueError("a ring of more than one peer needs both links")

    align = SEGMENT_ALIGN if codec is None else math.lcm(SEGMENT_ALIGN, codec.block_size)
    chunk = max(align, chunk_elems // align * align)  # chunks never cut a codec block
    bounds = segment_bounds(tensor.numel(), world, align)
    ring = _Ring(rank, send_link, recv_link, op_tag, on_step)
    cx = None if codec is None else _Codec(codec)
    wire_codec = None if codec is None else codec.codec
    block = 64 if codec is None else codec.block_size

    def seg(i: int) -> torch.Tensor:
        i %= world
        return out[bounds[i]:bounds[i + 1]]

    # Both ends know every segment's size, so both skip empty ones alike.
    def send_partial(t: torch.Tensor) -> Callable[[int], None]:
        def run(op: int) -> None:
            if t.numel():
                send_link.send(t, op, codec=wire_codec, block_size=block,
                               chunk_elems=chunk, timeout=timeout)
        return run

    def recv_add(t: torch.Tensor) -> Callable[[int], None]:
        def run(op: int) -> None:
            if t.numel():
                recv_link.recv_into(t, op, accumulate=True, timeout=timeout)
        return run

    # ---- reduce-scatter: N-1 hops, each adds one more peer's share ----
    for s in range(world - 1):
        ring.step(s, "reduce-scatter", send_partial(seg(rank - s)), recv_add(seg(rank - s - 1)))

    # ---- finalise the segment this rank now owns (summed over all N) ----
    own = (rank + 1) % world
    mine = seg(own)
    packed: dict[int, torch.Tensor] = {}  # segment -> its owner's packed bytes
    try:
        if average:
            mine.div_(world)
        if cx is not None and mine.numel():
            # Quantize once and adopt the dequantized value: the owner must end
            # with exactly what everybody else decodes from these bytes.
            packed[own] = cx.encode(mine)
            cx.decode_into(packed[own], mine)
    except Exception as e:  # e.g. a non-finite sum the codec refuses
        raise ring.abort(f"finalise failed: {type(e).__name__}: {e}", "finalise",
                         world - 1, None, e) from e

    # ---- all-gather: N-1 hops forwarding final values unchanged ----
    def send_final(i: int) -> Callable[[int], None]:
        i %= world  # `packed` is keyed by segment index

        def run(op: int) -> None:
            t = seg(i) if cx is None else packed.get(i)
            if t is not None and t.numel():
                send_link.send(t, op, chunk_elems=chunk if cx is None else byte_chunk,
                               timeout=timeout)
        return run

    def recv_final(i: int) -> Callable[[int], None]:
        i %= world
        t = seg(i)

        def run(op: int) -> None:
            if not t.numel():
                return
            if cx is None:
                recv_link.recv_into(t, op, timeout=timeout)  # straight into the result
                return
            packed[i] = buf = torch.empty(cx.packed_size(t.numel()), dtype=torch.uint8)
            recv_link.recv_into(buf, op, timeout=timeout)
            # Decoding here overlaps the send still running on the other
            # thread; the next step forwards these bytes, not the decoded ones.
            cx.decode_into(buf, t)
        return run

    byte_chunk = min(chunk * 4, MAX_CHUNK_ELEMS)  # packed frames as large as raw ones
    for s in range(world - 1):
        ring.step(world - 1 + s, "all-gather", send_final(rank + 1 - s), recv_final(rank - s))
    return out.view_as(tensor)
