"""Codec correctness: reference equality, error bounds, determinism, stochastic rounding."""

import struct

import pytest
import torch

from peerlearn import _native
from peerlearn.bench import torch_codecs as ref
from peerlearn.wire import codecs as C

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CODECS = list(C.Codec)
BLOCKED = sorted(C.BLOCK_CODECS)


@pytest.fixture(autouse=True)
def _restore_simd():
    yield
    C.set_simd(True)


def payload(p):
    return bytes(p.numpy()[32:])


def mixed(n, dtype, codec, seed=0):
    """Random values spanning tiny..huge magnitudes plus exact zeros, within the dtype's range."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-12, 4) if dtype == torch.float16 or codec == C.Codec.FP16 else (-30, 30)
    mags = 10.0 ** torch.randint(lo, hi + 1, (n // 16 + 1,), generator=g).float()
    x = torch.randn(n, generator=g) * mags.repeat_interleave(16)[:n]
    x[n // 3: n // 3 + 20] = 0.0
    return x.to(dtype)


# ----------------------------------------------------------------------------- golden bytes

# Input [1, -0.5, 0.25, 0, 3], float32, block_size 4 (a full block and a 1-element tail).
# E.g. INT8_ABSMAX: scale 1/127 = 0x3C010204, q = 127, round(-63.5) = -64 (0xC0, ties to
# even), round(31.75) = 32, 0; tail: scale 3/127 = 0x3CC18306, q = 127.
# INT8_MINMAX: min -0.5, scale 1.5/255, q = 255, 0, round(127.5) = 128, 85; tail: min 3, scale 0.
# E3M0: scale 1, t = 64|x| -> codes 7, -6 (0xE), 5, 0; FP8: scale 1/448, 448 -> 0x7E,
# -224 -> 0xF6, 112 -> 0x6E.
GOLDEN = {
    C.Codec.RAW: "0000803f000000bf0000803e0000000000004040",
    C.Codec.FP16: "003c00b8003400000042",
    C.Codec.BF16: "803f00bf803e00004040",
    C.Codec.INT8_ABSMAX: "0402013c7fc020000683c13c7f",
    C.Codec.INT8_MINMAX: "000000bfc1c0c03bff008055000040400000000000",
    C.Codec.INT4_ABSMAX: "2549123ec702b76ddb3e07",
    C.Codec.INT4_MINMAX: "000000bfcdcccc3d0f58000040400000000000",
    C.Codec.E3M0: "0000803fe7050000404007",
    C.Codec.FP8_E4M3: "2549123b7ef66e00b76ddb3b7e",
}


@pytest.mark.parametrize("codec", CODECS)
def test_golden_bytes(codec):
    x = torch.tensor([1.0, -0.5, 0.25, 0.0, 3.0])
    p = C.encode(x, codec, block_size=4)
    bs = 4 if codec in C.BLOCK_CODECS else 0
    hdr = struct.pack("<4sBBBBIIQQ", b"PLQ\x01", int(codec), 1, 0, 0, bs, 0, 5,
                      len(GOLDEN[codec]) // 2)
    assert bytes(p.numpy()[:32]) == hdr
    assert payload(p).hex() == GOLDEN[codec]


# ----------------------------------------------------------------------------- reference equality

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_matches_reference(codec, dtype, stochastic):
    for n, bs in [(1000, 64), (7, 3), (257, 256), (1, 1), (65, 1)]:
        x = mixed(n, dtype, codec, seed=n)
        nat = bytes(C.encode(x, codec, block_size=bs, stochastic=stochastic, seed=99).numpy())
        assert nat == ref.encode(x, codec, bs, stochastic, 99)
        assert torch.equal(C.decode(nat, dtype=torch.float32), ref.decode(nat))


# ----------------------------------------------------------------------------- error bounds

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_roundtrip_within_bound(codec, dtype, stochastic):
    for n, bs in [(4099, 64), (1, 64), (100, 7), (33, 1)]:
        x = mixed(n, dtype, codec, seed=n + 1)
        y = C.decode(C.encode(x, codec, block_size=bs, stochastic=stochastic), dtype=torch.float32)
        err = (y.double() - x.double()).abs()
        bound = C.error_bound(codec, x.float(), block_size=bs, stochastic=stochastic)
        assert (err <= bound).all(), (err - bound).max()
        if codec == C.Codec.RAW:
            assert torch.equal(y, x.float())


def test_zero_and_tiny_blocks_decode_to_exact_zeros():
    x = torch.zeros(200)
    x[64:128] = 1e-35  # below 2^-100: flushed to scale 0
    for codec in CODECS:
        y = C.decode(C.encode(x, codec), dtype=torch.float32)
        assert torch.equal(y[:64], torch.zeros(64)) and torch.equal(y[128:], torch.zeros(72))
        if codec in C.BLOCK_CODECS:
            assert (y[64:128] == 0).all() or codec in (C.Codec.INT8_MINMAX, C.Codec.INT4_MINMAX)


def test_constant_block_is_exact_for_minmax():
    x = torch.full((100,), -3.25)
    for codec in (C.Codec.INT8_MINMAX, C.Codec.INT4_MINMAX):
        assert torch.equal(C.decode(C.encode(x, codec)), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_into_16bit_equals_rounded_f32(dtype):
    x = torch.randn(1000)
    for codec in CODECS:
        p = C.encode(x, codec, block_size=32)
        assert torch.equal(C.decode(p, dtype=dtype), C.decode(p, dtype=torch.float32).to(dtype))


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("codec", CODECS)
def test_identical_across_threads_and_simd(codec):
    for dtype in DTYPES:
        x = mixed(20011, dtype, codec, seed=3)
        for sr in (False, True):
            outs = set()
            for simd in ([True, False] if _native.simd_available() else [False]):
                C.set_simd(simd)
                for t in (1, 2, 4, 7):
                    outs.add(bytes(C.encode(x, codec, block_size=48, stochastic=sr, seed=1,
                                            threads=t).numpy()))
            assert len(outs) == 1
            p = outs.pop()
            decs = []
            for simd in ([True, False] if _native.simd_available() else [False]):
                C.set_simd(simd)
                for t in (1, 3, 7):
                    decs.append(C.decode(p, dtype=torch.float32, threads=t))
                    decs.append(C.decode(p, dtype=dtype, threads=t).float())
            assert all(torch.equal(d, decs[0]) or torch.equal(d, decs[1]) for d in decs)


def test_simd_switch_reports_level():
    C.set_simd(False)
    assert C.simd_level() == "baseline"
    C.set_simd(True)
    assert C.simd_level() == ("avx2" if _native.simd_available() else "baseline")


# ----------------------------------------------------------------------------- stochastic rounding

@pytest.mark.parametrize("codec", [c for c in CODECS if c != C.Codec.RAW])
def test_stochastic_seed_and_chunking(codec):
    x = torch.randn(3000) * 0.37
    bs = 64
    a = C.encode(x, codec, block_size=bs, stochastic=True, seed=7)
    assert torch.equal(a, C.encode(x, codec, block_size=bs, stochastic=True, seed=7))
    assert not torch.equal(a, C.encode(x, codec, block_size=bs, stochastic=True, seed=8))
    assert C.parse_header(a)["stochastic"]
    cut = 17 * bs  # a block boundary (and a multiple of the flat codecs' chunking, not needed)
    p1 = C.encode(x[:cut], codec, block_size=bs, stochastic=True, seed=7)
    p2 = C.encode(x[cut:], codec, block_size=bs, stochastic=True, seed=7, element_offset=cut)
    assert payload(p1) + payload(p2) == payload(a)


@pytest.mark.parametrize("codec", [c for c in CODECS if c != C.Codec.RAW])
def test_stochastic_rounding_is_unbiased(codec):
    # Blocks of [1, -1, v, v, ...]: v sits strictly between two representable values.
    bs, nblk = 64, 1024
    v = 0.3001
    x = torch.full((nblk, bs), v)
    x[:, 0], x[:, 1] = 1.0, -1.0
    x = x.reshape(-1)
    y = C.decode(C.encode(x, codec, block_size=bs, stochastic=True, seed=11),
                 dtype=torch.float32).view(nblk, bs)[:, 2:].double()
    det = C.decode(C.encode(x, codec, block_size=bs), dtype=torch.float32)[2].item()
    vals = torch.unique(y)
    assert len(vals) == 2  # both neighbours occur
    step = (vals[1] - vals[0]).item()
    sigma = step / 2 / (y.numel() ** 0.5)
    assert abs(y.mean().item() - v) < 5 * sigma + 1e-7 * v
    assert abs(det - v) <= step  # deterministic lands on one of them


# ----------------------------------------------------------------------------- fused ops

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_encode_diff_equals_encode_of_difference(codec, dtype):
    a = (torch.randn(1001) * 4).to(dtype)
    b = (torch.randn(1001) * 4).to(dtype)
    d = C.encode_diff(a, b, codec, block_size=32, stochastic=True, seed=3)
    if codec == C.Codec.RAW:
        assert torch.equal(d, C.encode(a - b, codec))
    else:
        e = C.encode(a.float() - b.float(), codec, block_size=32, stochastic=True, seed=3)
        assert payload(d) == payload(e)
        assert C.parse_header(d)["dtype"] == dtype


@pytest.mark.parametrize("codec", CODECS)
def test_decode_accumulate(codec):
    x = torch.randn(999)
    acc = torch.randn(999)
    p = C.encode(x, codec, block_size=16)
    expect = acc + C.decode(p, dtype=torch.float32)
    got = C.decode_accumulate(p, acc, threads=3)
    assert got is acc and torch.equal(acc, expect)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_nonfinite_raises(codec, dtype):
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(300).to(dtype)
        x[200] = bad
        with pytest.raises(C.NonFiniteError, match=r"elements \[\d+, \d+\)"):
            C.encode(x, codec, block_size=64)
    big = torch.full((10,), torch.finfo(dtype).max, dtype=dtype)
    if dtype != torch.float16:  # a - b overflows float32
        with pytest.raises(C.NonFiniteError, match="a - b"):
            C.encode_diff(big, -big, codec)
    elif codec in (C.Codec.RAW, C.Codec.FP16):  # finite in float32, but not in float16
        with pytest.raises(C.CodecError, match="out of range"):
            C.encode_diff(big, -big, codec)
    else:
        y = C.decode(C.encode_diff(big, -big, codec), dtype=torch.float32)
        assert torch.allclose(y, torch.full((10,), 131008.0), rtol=0.34)


def test_out_of_range_and_option_errors():
    with pytest.raises(C.CodecError, match="out of range"):
        C.encode(torch.tensor([1e6]), C.Codec.FP16)
    with pytest.raises(C.CodecError, match="overflows"):
        C.encode(torch.tensor([-3e38, 3e38]), C.Codec.INT8_MINMAX)
    for bs in (0, C.MAX_BLOCK_SIZE + 1):
        with pytest.raises(C.CodecError, match="block_size"):
            C.encode(torch.randn(10), C.Codec.INT8_ABSMAX, block_size=bs)
    with pytest.raises(TypeError):
        C.encode(torch.arange(10), C.Codec.INT8_ABSMAX)
    with pytest.raises(TypeError):
        _native.encode_into(torch.arange(10), torch.empty(100, dtype=torch.uint8), 3)
    with pytest.raises(C.CodecError, match="need"):
        _native.encode_into(torch.randn(100), torch.empty(10, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="overlaps"):
        buf = torch.zeros(1024, dtype=torch.uint8)
        _native.encode_into(buf[:400].view(torch.float32), buf, 0)
    assert issubclass(C.DecodeError, C.CodecError) and issubclass(C.CodecError, ValueError)
    assert issubclass(C.NonFiniteError, C.CodecError)
    with pytest.raises(C.CodecError, match="overflows the output"):
        C.decode(C.encode(torch.tensor([1e6]), C.Codec.RAW), dtype=torch.float16)


# ----------------------------------------------------------------------------- buffers

def test_zero_copy_in_place_and_views():
    x = torch.randn(4, 250)
    out = torch.empty(C.packed_size(x.numel(), C.Codec.INT8_ABSMAX), dtype=torch.uint8)
    p = C.encode(x, C.Codec.INT8_ABSMAX, out=out)
    assert p.data_ptr() == out.data_ptr()
    dst = torch.full((4, 250), 123.0)
    ptr = dst.data_ptr()
    r = C.decode(out, out=dst)
    assert r is dst and dst.data_ptr() == ptr
    assert torch.equal(dst.reshape(-1), C.decode(p))
    # the packed buffer may be a bytes object, a bytearray or a uint8 tensor
    raw = bytes(p.numpy())
    assert torch.equal(C.decode(raw), C.decode(bytearray(raw)))
    # non-contiguous and requires_grad inputs are accepted (read through a copy / detach)
    w = torch.randn(8, 8, requires_grad=True)
    assert torch.equal(C.decode(C.encode(w.t(), C.Codec.RAW)), w.t().reshape(-1).detach())


def test_empty_and_header_fields():
    p = C.encode(torch.empty(0), C.Codec.INT4_MINMAX, block_size=5)
    assert p.numel() == C.HEADER_BYTES and C.decode(p).numel() == 0
    h = C.parse_header(C.encode(torch.randn(10, dtype=torch.bfloat16), C.Codec.E3M0, block_size=3))
    assert h["codec"] == C.Codec.E3M0 and h["dtype"] == torch.bfloat16
    assert h["block_size"] == 3 and h["numel"] == 10 and h["payload_bytes"] == 3 * (4 + 2) + (4 + 1)
    assert C.packed_size(10, C.Codec.FP16, torch.float32, block_size=999) == 32 + 20


def test_env_var_forces_baseline():
    import os
    import subprocess
    import sys
    env = dict(os.environ, PEERLEARN_CODEC_SCALAR="1")
    code = "from peerlearn import _native as n; print(n.simd_level())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "baseline"
