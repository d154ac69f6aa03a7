"""XXH64 must match the reference xxhash implementation bit for bit."""

import random

import torch
import xxhash

from peerlearn import _native
from peerlearn.wire import codecs as C


def test_all_short_lengths_and_seeds():
    rng = random.Random(1)
    data = bytes(rng.getrandbits(8) for _ in range(400))
    for n in range(301):
        seed = rng.getrandbits(64) if n % 3 else 0
        assert _native.xxh64(data[:n], seed) == xxhash.xxh64_intdigest(data[:n], seed), n


def test_unaligned_and_large():
    rng = random.Random(2)
    data = rng.randbytes(3 * 2**20 + 13)
    mv = memoryview(data)
    for off in range(8):
        assert C.hash_bytes(mv[off:], 5) == xxhash.xxh64_intdigest(data[off:], 5)
    seed = 2**64 - 1
    assert C.hash_bytes(data, seed) == xxhash.xxh64_intdigest(data, seed)


def test_hash_tensor_any_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8):
        t = (torch.randn(333) * 100).to(dtype)
        raw = (t if dtype != torch.bfloat16 else t.view(torch.int16)).numpy().tobytes()
        assert C.hash_tensor(t) == xxhash.xxh64_intdigest(raw)
        assert C.hash_tensor(t, seed=9) == xxhash.xxh64_intdigest(raw, 9)
    m = torch.randn(6, 7)
    assert C.hash_tensor(m.t()) == C.hash_tensor(m.t().contiguous())
    assert C.hash_tensor(m.t()) != C.hash_tensor(m)
    assert C.hash_tensor(torch.empty(0)) == xxhash.xxh64_intdigest(b"")
    one = torch.tensor(1.5)
    assert C.hash_tensor(one) == xxhash.xxh64_intdigest(one.numpy().tobytes())
