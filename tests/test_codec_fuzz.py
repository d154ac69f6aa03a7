"""Hostile and corrupted packed buffers: decoders must raise DecodeError or decode
finite values of the right size, never crash or read out of bounds."""

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerlearn.wire import codecs as C

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
HDR = struct.Struct("<4sBBBBIIQQ")


def _valid(codec, dtype, n, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return bytes(C.encode((torch.randn(n, generator=g) * 10).to(dtype), codec,
                          block_size=bs).numpy())


VALID = [_valid(c, d, n, bs, i)
         for i, (c, d, n, bs) in enumerate(
             (c, d, n, bs) for c in C.Codec for d in (torch.float32, torch.bfloat16, torch.float16)
             for n, bs in ((37, 8), (5, 3)))]


def _check(buf: bytes):
    """Decode through every entry point; success must give finite values."""
    try:
        h = C.parse_header(buf)
    except C.DecodeError:
        with pytest.raises(C.DecodeError):
            C.decode(buf)
        return False
    assert len(buf) == 32 + h["payload_bytes"]
    n = h["numel"]
    for dtype in (torch.float32, torch.bfloat16):
        try:
            y = C.decode(buf, dtype=dtype)
        except C.DecodeError:
            return False
        assert y.numel() == n and torch.isfinite(y).all()
    acc = torch.zeros(n)
    C.decode_accumulate(buf, acc)
    assert torch.isfinite(acc).all()
    with pytest.raises(C.DecodeError, match="elements"):
        C.decode(buf, out=torch.empty(n + 1))
    return True


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _check(data)


@SETTINGS
@given(st.sampled_from(VALID), st.data())
def test_truncation_and_extension(buf, data):
    cut = data.draw(st.integers(0, len(buf) - 1))
    with pytest.raises(C.DecodeError):
        C.decode(buf[:cut])
    with pytest.raises(C.DecodeError):
        C.decode(buf + data.draw(st.binary(min_size=1, max_size=8)))


@SETTINGS
@given(st.sampled_from(VALID), st.lists(st.integers(0, 10**6), min_size=1, max_size=4))
def test_bit_flips(buf, bits):
    b = bytearray(buf)
    for bit in bits:
        i = bit % (len(b) * 8)
        b[i // 8] ^= 1 << (i % 8)
    ok = _check(bytes(b))
    if any(bit % (len(b) * 8) < 32 * 8 for bit in bits) and ok:
        # a header flip that still decodes can only have touched the stochastic flag or
        # a field whose change keeps every size consistent
        assert C.parse_header(bytes(b))["payload_bytes"] == len(b) - 32


@SETTINGS
@given(codec=st.integers(0, 255), dtype=st.integers(0, 255), flags=st.integers(0, 255),
       res=st.integers(0, 255), bs=st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(
           [0, 1, C.MAX_BLOCK_SIZE, C.MAX_BLOCK_SIZE + 1, 2**32 - 1])),
       res2=st.integers(0, 2**32 - 1),
       numel=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1,
                                                                   2**62 + 1])),
       payload=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 64)),
       body=st.binary(max_size=64))
def test_hostile_headers(codec, dtype, flags, res, bs, res2, numel, payload, body):
    _check(HDR.pack(b"PLQ\x01", codec, dtype, flags, res, bs, res2, numel, payload) + body)


@pytest.mark.parametrize("codec", [c for c in C.Codec if c in C.BLOCK_CODECS])
def test_bad_scales_rejected(codec):
    good = bytearray(_valid(codec, torch.float32, 8, 8))
    off = 32 + (4 if codec in (C.Codec.INT8_MINMAX, C.Codec.INT4_MINMAX) else 0)
    # 3e38 overflows qmax * scale except for E3M0, whose largest magnitude is the scale
    huge = (3e38,) if codec != C.Codec.E3M0 else ()
    for val in (float("nan"), float("inf"), -1.0, -0.0, *huge):
        b = bytearray(good)
        b[off:off + 4] = struct.pack("<f", val)
        with pytest.raises(C.DecodeError, match="scale"):
            C.decode(bytes(b))
    if off == 36:  # the block min
        for val in (float("nan"), float("-inf"), float("inf")):
            b = bytearray(good)
            b[32:36] = struct.pack("<f", val)
            with pytest.raises(C.DecodeError, match="scale or min"):
                C.decode(bytes(b))


def test_specific_rejections():
    h = HDR.pack(b"PLQ\x01", int(C.Codec.INT8_ABSMAX), 1, 0, 0, 64, 0, 2**63, 0)
    with pytest.raises(C.DecodeError, match="impossible|payload"):
        C.decode(h)
    odd = bytearray(_valid(C.Codec.INT4_ABSMAX, torch.float32, 3, 3))
    odd[-1] |= 0x50
    with pytest.raises(C.DecodeError, match="padding"):
        C.decode(bytes(odd))
    fp8 = bytearray(_valid(C.Codec.FP8_E4M3, torch.float32, 4, 4))
    fp8[-1] = 0x7F
    with pytest.raises(C.DecodeError, match="NaN"):
        C.decode(bytes(fp8))
    f16 = bytearray(_valid(C.Codec.FP16, torch.float32, 4, 0))
    f16[-2:] = b"\x00\x7c"
    with pytest.raises(C.DecodeError, match="non-finite"):
        C.decode(bytes(f16))
    raw = bytearray(_valid(C.Codec.RAW, torch.float32, 4, 0))
    raw[36:40] = b"\x00\x00\xc0\x7f"
    with pytest.raises(C.DecodeError, match="non-finite"):
        C.decode(bytes(raw))
    good = bytearray(_valid(C.Codec.RAW, torch.float32, 4, 0))
    for i, v in ((0, 0), (4, 9), (5, 0), (6, 2), (7, 1), (8, 1), (12, 1)):
        b = bytearray(good)
        b[i] = v
        with pytest.raises(C.DecodeError):
            C.decode(bytes(b))
