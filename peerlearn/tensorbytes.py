"""The bytes of a CPU tensor as a Python buffer, without numpy.

The runtime must work on a plain `pip install .` (no numpy), so nothing on
the data path may call Tensor.numpy(). A ctypes array laid over the tensor's
memory gives the same zero-copy memoryview.
"""

from __future__ import annotations

import ctypes

import torch


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable, zero-copy memoryview ("B" format) of a contiguous CPU tensor's bytes.

    Invariants: the view aliases t's memory (writes through it show in t) and
    keeps t alive for as long as the view (or a slice of it) exists.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    arr = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
    arr._tensor = t  # the ctypes array does not own the memory: hold its owner
    return memoryview(arr).cast("B")
