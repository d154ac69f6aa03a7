"""The shared state: what every peer at the same step holds byte for byte.

Algorithms register tensors (outer parameters, outer optimizer state, ...)
by name; the step is part of the state. The state hash covers the step and,
in name order, each tensor's name, dtype, shape and bytes, so two peers with
equal hashes hold identical state (up to a 64-bit collision, which bit-parity
checks accept). Tensors are CPU and contiguous; the state owns them.

Hashing costs a pass over every byte (about 1 s for 8 GB), so each tensor's
hash is kept with its version counter (torch bumps it on every in-place
write through torch) and recomputed only when that moved: a state hashed
again without a change costs nothing, and a drift written through torch is
still seen. Writes that bypass torch (raw pointers, the buffer protocol)
must call `invalidate()`; the daemon does after every apply.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from peerlearn.wire.codecs import hash_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    hash: int  # xxh64 of the bytes


class SharedState:
    def __init__(self, step: int = 0):
        self.step = step
        self.tensors: dict[str, torch.Tensor] = {}
        self._hashes: dict[str, tuple[tuple[int, int, int], int]] = {}  # name -> (key, xxh64)

    def invalidate(self) -> None:
        """Forget the kept tensor hashes: the next hash reads every byte."""
        self._hashes.clear()

    def _tensor_hash(self, name: str, t: torch.Tensor) -> int:
        key = (t._version, t.data_ptr(), t.numel())
        kept = self._hashes.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        h = hash_tensor(t)
        self._hashes[name] = (key, h)
        return h

    def register(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Takes a tensor into the state (no copy if already CPU and contiguous)."""
        if name in self.tensors:
            raise KeyError(f"{name!r} is already registered")
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"{tensor.dtype} cannot be part of the shared state")
        t = tensor.detach().to("cpu").contiguous()
        self.tensors[name] = t
        return t

    def manifest(self) -> list[TensorEntry]:
        return [TensorEntry(n, DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size(),
                            self._tensor_hash(n, t)) for n, t in sorted(self.tensors.items())]

    def state_hash(self, manifest: list[TensorEntry] | None = None) -> bytes:
        """8 bytes identifying (step, every tensor's name, dtype, shape and bytes)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(struct.pack("<Q", self.step))
        for e in manifest if manifest is not None else self.manifest():
            h.update(struct.pack("<I", len(e.name)) + e.name.encode())
            h.update(e.dtype.encode() + struct.pack(f"<I{len(e.shape)}q", len(e.shape), *e.shape))
            h.update(struct.pack("<Q", e.hash))
        return h.digest()
