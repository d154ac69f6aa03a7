"""Vectorised PyTorch (and numpy, for the random stream) reference codecs.

numpy is optional (a plain install has none): only stochastic rounding needs
it, and without it those paths raise RuntimeError; the codec benchmark's
baseline is deterministic and runs either way.

They implement the packed format of ``docs/protocol.md`` with the same float32
operations as the native kernels, so their output must match
``peerlearn.wire.codecs.encode`` byte for byte; the tests rely on that, and the
codec benchmark uses them as the "plain PyTorch" baseline. Clarity over speed,
but no Python loops over elements or blocks.
"""

from __future__ import annotations

import struct

import torch

from peerlearn.tensorbytes import byte_view
from peerlearn.wire.codecs import BLOCK_CODECS, Codec

try:
    import numpy as np
except ImportError:
    np = None
HAVE_NUMPY = np is not None

TINY = 2.0 ** -100
_DT = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_QMAX = {Codec.INT8_ABSMAX: 127, Codec.INT4_ABSMAX: 7, Codec.INT8_MINMAX: 255,
         Codec.INT4_MINMAX: 15}
GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_words(seed: int, first: int, n: int) -> np.ndarray:
    """The stochastic-rounding words mix64(key + i*GOLDEN), i = first..first+n-1."""
    if np is None:
        raise RuntimeError("the reference codecs' stochastic rounding needs numpy")
    with np.errstate(over="ignore"):
        key = _mix64(np.array([(seed + GOLDEN) % 2**64], dtype=np.uint64))[0]
        idx = np.arange(first, first + n, dtype=np.uint64)
        return _mix64(key + idx * np.uint64(GOLDEN))


def uniforms(seed: int, first: int, n: int) -> torch.Tensor:
    """u_i = (word_i >> 40) * 2^-24 as float32, in [0, 1)."""
    w = random_words(seed, first, n) >> np.uint64(40)
    return torch.from_numpy(w.astype(np.float32) * np.float32(2.0 ** -24))


def header(codec: Codec, dtype: torch.dtype, numel: int, block_size: int, flags: int,
           payload: int) -> bytes:
    return struct.pack("<4sBBBBIIQQ", b"PLQ\x01", int(codec), _DT[dtype], flags, 0,
                       block_size, 0, numel, payload)


def _sortable(x: torch.Tensor) -> torch.Tensor:
    i = x.view(torch.int32)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


def _unsortable(s: torch.Tensor) -> torch.Tensor:
    return (s ^ ((s >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """Rows of values 0..15 -> rows of bytes, low nibble first, odd tail padded with 0."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def _sr_float(u: np.ndarray, m: int, bias: int, r: np.ndarray) -> np.ndarray:
    """Stochastic rounding of |x| bits u to m mantissa bits (see codec_kernels.h)."""
    if np is None:
        raise RuntimeError("the reference codecs' stochastic rounding needs numpy")
    u = u.astype(np.uint64)
    E = (u >> np.uint64(23)).astype(np.int64)
    M = u & np.uint64(0x7FFFFF)
    sub = E == 0
    E = np.where(sub, 1, E)
    M = np.where(sub, M, M | np.uint64(0x800000))
    e = E - 127
    emin = 1 - bias
    s = (23 - m) + np.where(e < emin, emin - e, 0)
    sc = np.minimum(s, 63).astype(np.uint64)
    mask = (np.uint64(1) << sc) - np.uint64(1)
    k = np.where(s >= 64, np.uint64(0), (M + (r & mask)) >> sc).astype(np.int64)
    return np.where(e < emin, k, ((e + bias) << m) + k - (1 << m))


def _blocks_encode(codec: Codec, X: torch.Tensor, sr: bool, seed: int, first: int) -> torch.Tensor:
    """X: [nb, n] float32 rows (one row per block, all of length n). Returns [nb, rec] uint8."""
    nb, n = X.shape
    u = uniforms(seed, first, nb * n).view(nb, n) if sr else None
    if codec in (Codec.INT8_MINMAX, Codec.INT4_MINMAX):
        s = _sortable(X)
        mn, mx = _unsortable(s.amin(1)), _unsortable(s.amax(1))
        rng = mx - mn
        if not torch.isfinite(rng).all():
            raise ValueError("range overflow")
        base, y_in = mn, X - mn[:, None]
        a = rng
    else:
        a = X.abs().amax(1)
        base, y_in = None, X
    if not torch.isfinite(X).all():
        raise ValueError("non-finite")
    keep = a >= TINY
    zero = torch.zeros_like(a)
    if codec in _QMAX:
        qm = float(_QMAX[codec])
        scale = torch.where(keep, a / _f32(qm).expand_as(a), zero)
        inv = torch.where(keep, _f32(qm).expand_as(a) / a, zero)
        y = y_in * inv[:, None]
        if sr:
            f = torch.floor(y)
            y = f + (u < (y - f)).float()
        else:
            y = torch.round(y)
        lo = -qm if base is None else 0.0
        q = torch.clamp(y, lo, qm).to(torch.int32)
        if codec in (Codec.INT8_ABSMAX, Codec.INT8_MINMAX):
            codes = q.to(torch.int8).view(torch.uint8) if base is None else q.to(torch.uint8)
        else:
            codes = _nibbles(q & 15)
    elif codec == Codec.E3M0:
        scale = torch.where(keep, a, zero)
        inv = torch.where(keep, _f32(64.0).expand_as(a) / a, zero)
        t = X.abs() * inv[:, None]
        if sr:
            e = sum((t >= v).to(torch.int32) for v in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
            lo = torch.where(e == 0, 0.0, torch.exp2((e - 1).float()))
            w = torch.where(e == 0, 1.0, lo)
            c = torch.where(e >= 7, 7, e + (u < (t - lo) / w).to(torch.int32))
        else:
            c = sum((t >= v).to(torch.int32) for v in (0.5, 1.5, 3.0, 6.0, 12.0, 24.0, 48.0))
        sign = (X.view(torch.int32) < 0) & (c != 0)
        codes = _nibbles(c | (sign.to(torch.int32) << 3))
    elif codec == Codec.FP8_E4M3:
        scale = torch.where(keep, a / _f32(448.0).expand_as(a), zero)
        inv = torch.where(keep, _f32(448.0).expand_as(a) / a, zero)
        y = X * inv[:, None]
        if sr:
            bits = y.view(torch.int32).numpy().astype(np.uint32)
            r = random_words(seed, first, nb * n).reshape(nb, n)
            mag = _sr_float(bits & 0x7FFFFFFF, 3, 7, r)
            c = torch.from_numpy(np.minimum(mag, 0x7E).astype(np.int32))
        else:
            c = y.abs().to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
        sign = (y.view(torch.int32) < 0) & (c != 0)
        codes = (c | (sign.to(torch.int32) << 7)).to(torch.uint8)
    else:
        raise ValueError(codec)
    parts = ([base.contiguous().view(torch.uint8).view(nb, 4)] if base is not None else [])
    parts += [scale.contiguous().view(torch.uint8).view(nb, 4), codes]
    return torch.cat(parts, dim=1)


def encode_payload(x: torch.Tensor, codec: Codec, block_size: int = 64, stochastic: bool = False,
                   seed: int = 0, element_offset: int = 0,
                   b: torch.Tensor | None = None) -> torch.Tensor:
    """Reference payload (no header) for x (or x - b) as a 1-D uint8 tensor."""
    codec = Codec(codec)
    dtype = x.dtype
    v = x.reshape(-1).float()
    if b is not None:
        v = v - b.reshape(-1).float()
    n = v.numel()
    if not torch.isfinite(v).all():
        raise ValueError("non-finite")
    sr = stochastic and codec != Codec.RAW
    if codec == Codec.RAW:
        return (v.to(dtype) if b is not None else x.reshape(-1)).contiguous().view(torch.uint8)
    if codec in (Codec.FP16, Codec.BF16):
        if sr:
            m, bias, inf = (10, 15, 0x7C00) if codec == Codec.FP16 else (7, 127, 0x7F80)
            bits = v.view(torch.int32).numpy().astype(np.uint32)
            mag = _sr_float(bits & 0x7FFFFFFF, m, bias, random_words(seed, element_offset, n))
            if (mag >= inf).any():
                raise ValueError("overflow")
            h = (mag | ((bits >> 16) & 0x8000)).astype(np.uint16)
            return torch.from_numpy(h.view(np.uint8))
        t = v.to(torch.float16 if codec == Codec.FP16 else torch.bfloat16)
        if not torch.isfinite(t).all():
            raise ValueError("overflow")
        return t.view(torch.uint8)
    bs = block_size
    full = n // bs * bs
    chunks = []
    if full:
        chunks.append(_blocks_encode(codec, v[:full].view(-1, bs), sr, seed, element_offset))
    if n > full:
        chunks.append(_blocks_encode(codec, v[full:].view(1, -1), sr, seed, element_offset + full))
    if not chunks:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([c.reshape(-1) for c in chunks])


def encode(x: torch.Tensor, codec: Codec, block_size: int = 64, stochastic: bool = False,
           seed: int = 0, element_offset: int = 0, b: torch.Tensor | None = None) -> bytes:
    """Reference packed bytes for x (or x - b); raises ValueError on non-finite input."""
    codec = Codec(codec)
    body = encode_payload(x, codec, block_size, stochastic, seed, element_offset, b)
    bs_field = block_size if codec in BLOCK_CODECS else 0
    sr = int(stochastic and codec != Codec.RAW)
    return header(codec, x.dtype, x.numel(), bs_field, sr, body.numel()) + bytes(byte_view(body))


_E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
_E3M0 = torch.tensor([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], dtype=torch.float32)
_E3M0 = torch.cat([_E3M0, -_E3M0])


def _blocks_decode(codec: Codec, R: torch.Tensor, n: int) -> torch.Tensor:
    """R: [nb, rec] uint8 records of n elements each -> [nb, n] float32."""
    def f32(col):
        return R[:, col:col + 4].clone(memory_format=torch.contiguous_format).view(torch.float32)
    if codec in (Codec.INT8_MINMAX, Codec.INT4_MINMAX):
        mn, scale, codes = f32(0), f32(4), R[:, 8:]
    else:
        mn, scale, codes = None, f32(0), R[:, 4:]
    if codec in (Codec.INT4_ABSMAX, Codec.INT4_MINMAX, Codec.E3M0):
        c = codes.to(torch.int32)
        codes = torch.stack([c & 15, c >> 4], dim=2).reshape(c.shape[0], -1)[:, :n]
    else:
        codes = codes.to(torch.int32)
    if codec == Codec.INT8_ABSMAX:
        q = codes.to(torch.uint8).view(torch.int8).float()
    elif codec == Codec.INT4_ABSMAX:
        q = ((codes ^ 8) - 8).float()
    elif codec == Codec.E3M0:
        q = _E3M0[codes]
    elif codec == Codec.FP8_E4M3:
        q = _E4M3[codes]
    else:
        q = codes.float()
    y = q * scale
    return y if mn is None else mn + y


def decode_payload(body: torch.Tensor, codec: Codec, dtype: torch.dtype, n: int,
                   bs: int) -> torch.Tensor:
    """Reference float32 decode of a payload (1-D uint8 tensor), no validation."""
    if codec == Codec.RAW:
        return body.view(dtype).to(torch.float32, copy=True)
    if codec == Codec.FP16:
        return body.view(torch.float16).float()
    if codec == Codec.BF16:
        return body.view(torch.bfloat16).float()
    pre = 8 if codec in (Codec.INT8_MINMAX, Codec.INT4_MINMAX) else 4
    nib = codec in (Codec.INT4_ABSMAX, Codec.INT4_MINMAX, Codec.E3M0)

    def rec(k):
        return pre + ((k + 1) // 2 if nib else k)
    full = n // bs
    out = []
    if full:
        out.append(_blocks_decode(codec, body[:full * rec(bs)].view(full, -1), bs).reshape(-1))
    if n % bs:
        out.append(_blocks_decode(codec, body[full * rec(bs):].view(1, -1), n % bs).reshape(-1))
    return torch.cat(out) if out else torch.empty(0)


def decode(packed: bytes) -> torch.Tensor:
    """Reference float32 decode of a valid packed buffer (no validation)."""
    codec, dt, _flags, _r, bs, _r2, n, _p = struct.unpack_from("<4sBBBBIIQQ", packed)[1:]
    body = torch.frombuffer(bytearray(packed[32:]), dtype=torch.uint8)
    dtype = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}[dt]
    return decode_payload(body, Codec(codec), dtype, n, bs)
