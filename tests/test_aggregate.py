"""The robust aggregation rules (swarm/aggregate.py) and the ring all-gather
that feeds them (swarm/allgather.py): exact values, robustness to one bad
row, and the same bits whatever the thread count or SIMD width."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from peerlearn.swarm.aggregate import (
    aggregate,
    centered_clip,
    coordinate_median,
    fixed_order_norm,
    trim,
    trimmed_mean,
)

SECRET = b"s" * 32


def _honest(n: int, numel: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    return base + 0.1 * torch.randn(n, numel, generator=g)


def test_golden_values_on_a_small_table():
    rows = torch.tensor([[1.0, -2.0, 5.0], [3.0, 0.0, 4.0], [2.0, 100.0, 6.0], [0.0, 1.0, 7.0],
                         [4.0, -1.0, 3.0]])
    assert coordinate_median(rows).tolist() == [2.0, 0.0, 5.0]
    assert coordinate_median(rows[:4]).tolist() == [1.5, 0.5, 5.5]
    assert trim(5) == 1 and trim(7) == 2 and trim(3) == 1 and trim(2) == 0
    # drop min and max per column, then (a + b + c) / 3
    assert trimmed_mean(rows, 1).tolist() == [2.0, 0.0, 5.0]
    assert aggregate(rows, "mean").value.tolist() == pytest.approx([2.0, 19.6, 5.0])


def test_centered_clip_is_a_fixed_point_of_its_iteration_on_equal_rows():
    rows = torch.ones(4, 10) * 3.5
    assert torch.equal(centered_clip(rows), rows[0])


def test_centered_clip_bounds_one_huge_row():
    honest = _honest(4, 1000)
    mean = honest.mean(0)
    for bad in (honest[0] * 1e30, honest[0] * -10, torch.randn(1000) * 100):
        rows = torch.cat([honest, bad[None]])
        got = aggregate(rows, "centered-clip").value
        spread = float((honest - mean).norm(dim=1).max())
        # the bad row moves the result by at most about the honest spread / n
        assert float((got - mean).norm()) < spread, bad[:3]
        assert float((aggregate(rows, "mean").value - mean).norm()) > spread


def test_a_non_finite_row_is_left_out_and_reported():
    honest = _honest(4, 100)
    rows = torch.cat([honest[:2], torch.full((1, 100), math.nan), honest[2:]])
    for rule in ("mean", "centered-clip", "trimmed-mean", "median"):
        got = aggregate(rows, rule)
        assert got.refused == (2,)
        assert torch.equal(got.value, aggregate(honest, rule).value), rule
    none = aggregate(torch.full((2, 5), math.inf), "centered-clip")
    assert none.refused == (0, 1) and torch.isnan(none.value).all()


def test_fixed_order_norm_matches_float64():
    for n in (0, 1, 2, 3, 1000, 4097):
        x = torch.randn(n)
        assert fixed_order_norm(x) == pytest.approx(float(x.double().norm()), rel=1e-12)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate(torch.zeros(2, 2), "krum")


_DIGEST = """
import hashlib, numpy, torch
from peerlearn.swarm.aggregate import aggregate
# numpy's generator: torch.randn's own bits change with the SIMD width
rows = torch.from_numpy(numpy.random.default_rng(5).standard_normal((5, 300_001)).astype("f4"))
rows[3] *= 1e6
out = b"".join(aggregate(rows, r).value.numpy().tobytes()
               for r in ("mean", "centered-clip", "trimmed-mean", "median"))
print(hashlib.sha256(out).hexdigest())
"""


def test_the_same_bits_whatever_the_threads_or_simd_width():
    """Every honest peer must compute the same bits (the parity check):
    one thread and no SIMD (ATEN_CPU_CAPABILITY=default) against the
    machine's widest kernels and every thread."""
    digests = set()
    for env in ({"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
                {"OMP_NUM_THREADS": str(os.cpu_count() or 2)}):
        out = subprocess.run([sys.executable, "-c", _DIGEST], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=120, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests


@pytest.mark.parametrize("codec", [None, "int8"])
def test_ring_allgather_gives_every_rank_the_same_rows(codec):
    from peerlearn.swarm.allgather import ring_allgather
    from peerlearn.swarm.allreduce import CodecSpec
    from peerlearn.swarm.ring import connect_ring
    from peerlearn.transport.stream import LinkListener
    from peerlearn.wire.codecs import Codec

    world, numel = 3, 70_001
    inputs = [torch.randn(numel) for _ in range(world)]
    spec = None if codec is None else CodecSpec(int(Codec.INT8_ABSMAX))
    listeners = [LinkListener("127.0.0.1", 0, SECRET) for _ in range(world)]
    addrs = [lst.address for lst in listeners]
    results: dict[int, torch.Tensor] = {}
    errors: dict[int, BaseException] = {}

    def rank(r: int) -> None:
        try:
            ring = connect_ring(r, addrs, listeners[r], SECRET, ring_tag=3, n_conns=2,
                                timeout=20)
            try:
                results[r] = ring_allgather(inputs[r], rank=r, world=world,
                                            send_link=ring.send, recv_link=ring.recv,
                                            op_tag=9, codec=spec, timeout=20)
            finally:
                ring.close()
        except BaseException as e:  # noqa: BLE001 - checked below
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for lst in listeners:
        lst.close()
    assert not errors, errors
    digests = {hashlib.sha256(results[r].numpy().tobytes()).hexdigest() for r in range(world)}
    assert len(digests) == 1
    for r in range(world):
        if codec is None:
            assert torch.equal(results[0][r], inputs[r])
        else:
            assert torch.allclose(results[0][r], inputs[r], atol=0.05)
