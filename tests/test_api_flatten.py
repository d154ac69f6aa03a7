"""api.flatten keeps no reference to the caller's tensors: a contribution
the caller let go of is not held a second time while its round runs."""

from __future__ import annotations

import gc
import weakref

import torch

from peerlearn.swarm.api import flatten


def test_unflatten_keeps_the_layout_not_the_tensors():
    tensors = {"w": torch.randn(1000), "m": torch.ones(3, 7, dtype=torch.bfloat16)}
    refs = [weakref.ref(t) for t in tensors.values()]
    flat, unflatten = flatten(tensors)
    del tensors
    gc.collect()
    assert all(r() is None for r in refs)  # only the flat copy is alive
    out = unflatten(flat)
    assert out["w"].shape == (1000,) and out["m"].shape == (3, 7)
    assert out["m"].dtype == torch.bfloat16 and float(out["m"][0, 0]) == 1.0
