"""Ring all-gather of whole contributions, for the robust aggregation rules
(aggregate.py), which need every row rather than their sum.

The same ring as the all-reduce (allreduce.py): rank r sends to r+1 and
receives from r-1 (mod N). In step s = 0..N-2 rank r forwards row (r - s) % N
and receives row (r - s - 1) % N; after N-1 steps every rank holds every row.
Each row is encoded once, by its owner, and forwarded byte for byte; the
owner adopts the decoded value of its own bytes. So every rank holds the
same rows bit for bit, quantized or not, as long as nobody on the ring
changes what it forwards.

A dishonest forwarder can change a row on its way (or its owner can send
different rows to its two neighbours' sides of the ring): the ranks then hold
different rows, compute different aggregates, and report different result
hashes, and the coordinator aborts the round and traces the culprit as it
traces a poisoned one (suspicion.py). Rows cannot be forged undetected; they
can be made to disagree, which costs rounds, not correctness.

Cost: every rank receives and sends (N-1) rows, against 2(N-1)/N of one row
for the ring all-reduce: N/2 times the all-reduce's bytes, and N copies of
the contribution in memory. That is the price of seeing every contribution;
it bounds this mode to groups of tens of peers.

Invariants as for ring_allreduce: the input is only read; the call returns
all rows or raises AllReduceAborted after shutting both links down.
"""

from __future__ import annotations

import threading

import torch

from peerlearn.swarm.allreduce import (
    MAX_CHUNK_ELEMS,
    MAX_WORLD,
    AllReduceAborted,  # noqa: F401 - what ring_allgather raises
    CodecSpec,
    _Pipeline,
    op_id,
)
from peerlearn.transport.stream import DEFAULT_CHUNK_ELEMS, Link
from peerlearn.wire import codecs


def ring_allgather(tensor: torch.Tensor, *, rank: int, world: int, send_link: Link | None,
                   recv_link: Link | None, op_tag: int, codec: CodecSpec | None = None,
                   timeout: float = 60.0, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> torch.Tensor:
    """Returns a new (world, numel) fp32 tensor: row i is rank i's `tensor`
    (with a codec: what rank i's bytes decode to, its own row included).

    tensor: contiguous fp32 CPU, the same numel at every rank. Links and
    op_tag as for ring_allreduce (op ids: op_tag << 16 | step). Raises
    AllReduceAborted (phase "all-gather") on any failure.
    """
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or \
            not tensor.is_contiguous():
        raise TypeError("ring_allgather gathers contiguous fp32 CPU tensors")
    if not 1 <= world <= MAX_WORLD or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world <= {MAX_WORLD}")
    op_id(op_tag, 0)
    flat = tensor.view(-1)
    rows = torch.empty(world, flat.numel(), dtype=torch.float32)
    packed: dict[int, torch.Tensor] = {}
    if codec is None:
        rows[rank].copy_(flat)
    else:
        packed[rank] = codecs.encode(flat, codec.codec, block_size=codec.block_size)
        codecs.decode(packed[rank], out=rows[rank])
    if world == 1:
        return rows
    if send_link is None or recv_link is None:
        raise ValueError("a ring of more than one peer needs both links")
    pipe = _Pipeline(rank, send_link, recv_link, op_tag, pieces=1)
    n_steps = world - 1
    size = None if codec is None else codecs.packed_size(flat.numel(), codec.codec,
                                                         torch.float32, codec.block_size)

    def receive_all() -> None:
        for g in range(n_steps):
            i = (rank - g - 1) % world
            try:
                if flat.numel() == 0:
                    pass
                elif codec is None:
                    recv_link.recv_into(rows[i], pipe.op(g, 0), timeout=timeout)
                else:
                    packed[i] = buf = torch.empty(size, dtype=torch.uint8)
                    recv_link.recv_into(buf, pipe.op(g, 0), timeout=timeout)
                    codecs.decode(buf, out=rows[i])  # forwarded as received, not re-encoded
            except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
                pipe.fail("all-gather", g, "recv", e)
                return
            pipe.mark_received()

    receiver = threading.Thread(target=receive_all, name=f"allgather-recv-{op_tag}")
    try:
        receiver.start()
    except BaseException as e:  # noqa: BLE001 - no thread: nothing runs, tell the neighbours
        pipe.fail("setup", 0, None, e)
        raise pipe.aborted() from e
    g = 0
    try:
        for g in range(n_steps):
            if g and not pipe.wait_received(g - 1, 0):
                break
            i = (rank - g) % world
            if flat.numel() == 0:
                continue
            if codec is None:
                send_link.send(rows[i], pipe.op(g, 0), chunk_elems=chunk_elems, timeout=timeout)
            else:
                send_link.send(packed[i], pipe.op(g, 0),
                               chunk_elems=min(chunk_elems * 4, MAX_CHUNK_ELEMS),
                               timeout=timeout)
    except BaseException as e:  # noqa: BLE001 - re-raised below as AllReduceAborted
        pipe.fail("all-gather", g, "send", e)
    finally:
        receiver.join()  # never leave a thread writing into our buffers
    if pipe.errors:
        err = pipe.aborted()
        raise err from err.cause
    return rows
