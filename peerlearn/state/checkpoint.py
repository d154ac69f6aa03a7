"""Checkpoints of the shared state: a self-describing file, written atomically.

Layout (little-endian):
    8 bytes   magic b"PLCKPT01"
    4 bytes   header length H (at most 16 MiB)
    H bytes   msgpack {"step": int, "hash": bytes(8),
                       "tensors": [[name, dtype, shape, offset, nbytes], ...]}
    payload   tensor bytes at their offsets (relative to the payload start)

Loading validates every field and recomputes the state hash; nothing is
unpickled. A file that fails any check raises CheckpointError and is never
half-loaded.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import msgpack
import torch

from peerlearn.state.atomic import write_atomic
from peerlearn.state.shared import DTYPES, SharedState
from peerlearn.tensorbytes import byte_view

MAGIC = b"PLCKPT01"
MAX_HEADER = 16 << 20
ALIGN = 64


class CheckpointError(ValueError):
    pass


def save(state: SharedState, path: str | Path) -> bytes:
    """Writes state to path atomically; returns the state hash recorded in it."""
    manifest = state.manifest()
    entries, offset = [], 0
    for e in manifest:
        entries.append([e.name, e.dtype, list(e.shape), offset, e.nbytes])
        offset += -(-e.nbytes // ALIGN) * ALIGN
    digest = state.state_hash(manifest)
    header = msgpack.packb({"step": state.step, "hash": digest, "tensors": entries},
                           use_bin_type=True)

    def chunks():
        yield MAGIC + struct.pack("<I", len(header)) + header
        for name, _, _, _, nbytes in entries:
            yield byte_view(state.tensors[name].view(-1).view(torch.uint8))
            yield b"\0" * (-nbytes % ALIGN)

    write_atomic(path, chunks())
    return digest


def load(path: str | Path) -> SharedState:
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:8] != MAGIC:
        raise CheckpointError(f"{path}: not a peerlearn checkpoint")
    (hlen,) = struct.unpack_from("<I", data, 8)
    if hlen > MAX_HEADER or 12 + hlen > len(data):
        raise CheckpointError(f"{path}: header length {hlen} is out of range")
    try:
        header = msgpack.unpackb(data[12:12 + hlen], raw=False, strict_map_key=True)
        step, digest, tensors = header["step"], header["hash"], header["tensors"]
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable header ({type(e).__name__})") from None
    if type(step) is not int or step < 0 or not isinstance(digest, bytes) or \
            not isinstance(tensors, list):
        raise CheckpointError(f"{path}: malformed header")
    payload = memoryview(data)[12 + hlen:]
    state = SharedState(step)
    for t in tensors:
        try:
            name, dtype, shape, off, nbytes = t
            dt = DTYPES[dtype]
            ok = isinstance(name, str) and all(type(s) is int and s >= 0 for s in shape) \
                and type(off) is int and type(nbytes) is int and off >= 0 \
                and off + nbytes <= len(payload) \
                and math.prod(shape) * dt.itemsize == nbytes
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: malformed tensor entry {str(t)[:80]}")
        if nbytes == 0:
            state.tensors[name] = torch.empty(shape, dtype=dt)
            continue
        raw = torch.frombuffer(bytearray(payload[off:off + nbytes]), dtype=torch.uint8)
        state.tensors[name] = raw.view(dt).reshape(shape)
    if state.state_hash() != digest:
        raise CheckpointError(f"{path}: state hash does not match its contents")
    return state
