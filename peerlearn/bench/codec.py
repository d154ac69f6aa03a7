"""Codec throughput: native kernels vs plain PyTorch vs a memory copy, in one run.

All rates are GB/s of float32 *input* bytes (numel * 4), best of ``repeat``
runs, so encode and decode figures compare directly with copying the tensor.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from peerlearn.bench import torch_codecs
from peerlearn.wire import codecs as C


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _simple_int8_encode(x: torch.Tensor, block_size: int):
    """The textbook vectorised absmax int8 codec (scales and codes apart, no packing):
    what a PyTorch user would write, and the baseline the issue's figures quote."""
    b = x.view(-1, block_size)
    scale = b.abs().amax(1, keepdim=True) / 127
    q = torch.round(b / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _simple_int8_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale).view(-1)


def _bench_simple_int8(x, block_size, torch_repeat, enc_s, dec_s) -> dict:
    gb = x.numel() * 4 / 1e9
    usable = x[: x.numel() // block_size * block_size]
    q, scale = _simple_int8_encode(usable, block_size)
    t_enc = _best(lambda: _simple_int8_encode(usable, block_size), torch_repeat)
    t_dec = _best(lambda: _simple_int8_decode(q, scale), torch_repeat)
    return {
        "torch_simple_encode_gbps": round(gb / t_enc, 3),
        "torch_simple_decode_gbps": round(gb / t_dec, 3),
        "encode_vs_torch_simple": round(t_enc / enc_s, 2),
        "decode_vs_torch_simple": round(t_dec / dec_s, 2),
    }


def _bench_codec(codec, x, dst, block_size, nt, repeat, torch_repeat, copy_s) -> dict:
    numel = x.numel()
    gb = numel * 4 / 1e9
    out = torch.empty(C.packed_size(numel, codec, torch.float32, block_size), dtype=torch.uint8)
    C.encode(x, codec, block_size=block_size, threads=nt, out=out)
    enc_s = _best(lambda: C.encode(x, codec, block_size=block_size, threads=nt, out=out), repeat)
    dec_s = _best(lambda: C.decode(out, out=dst, threads=nt), repeat)
    body = out[C.HEADER_BYTES:]
    t_enc = _best(lambda: torch_codecs.encode_payload(x, codec, block_size), torch_repeat)
    t_dec = _best(lambda: torch_codecs.decode_payload(body, codec, torch.float32, numel,
                                                      block_size), torch_repeat)
    extra = _bench_simple_int8(x, block_size, torch_repeat, enc_s, dec_s) \
        if codec == C.Codec.INT8_ABSMAX else {}
    return {
        **extra,
        "packed_bytes": out.numel(),
        "encode_gbps": round(gb / enc_s, 3),
        "decode_gbps": round(gb / dec_s, 3),
        "torch_encode_gbps": round(gb / t_enc, 3),
        "torch_decode_gbps": round(gb / t_dec, 3),
        "encode_vs_torch": round(t_enc / enc_s, 2),
        "decode_vs_torch": round(t_dec / dec_s, 2),
        "encode_vs_memcpy": round(copy_s / enc_s, 3),
        "decode_vs_memcpy": round(copy_s / dec_s, 3),
    }


def run(numel: int = 64 * 2**20, threads: int | None = None, repeat: int = 5,
        torch_repeat: int = 2, block_size: int = 64, codecs=None) -> dict:
    """Benchmark every codec (or ``codecs``) on ``numel`` random float32 values.

    ``threads``: native thread count and torch's intra-op thread count for the
    baseline and the copy (None: library defaults). Returns a JSON-ready dict.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(numel, generator=g)
        gb = numel * 4 / 1e9
        dst = torch.empty_like(x)
        dst.copy_(x)  # first touch outside the timing
        copy_s = _best(lambda: dst.copy_(x), repeat)
        nt = threads or 0
        result = {
            "numel": numel,
            "block_size": block_size,
            "threads": threads,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "simd": C.simd_level(),
            "repeat": repeat,
            "memcpy_gbps": round(gb / copy_s, 3),
            # The PyTorch baseline is deterministic and runs without numpy;
            # recorded so a figure from a plain install is recognisable.
            "numpy_available": torch_codecs.HAVE_NUMPY,
            "codecs": {},
        }
        for codec in codecs or list(C.Codec):
            codec = C.Codec(codec)
            result["codecs"][codec.name] = _bench_codec(codec, x, dst, block_size, nt, repeat,
                                                        torch_repeat, copy_s)
        return result
    finally:
        torch.set_num_threads(old_threads)


if __name__ == "__main__":
    print(json.dumps(run()))
