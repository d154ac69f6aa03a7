"""Quantized tensor codecs and tensor hashing (Python face of ``peerlearn._native``).

Packed format: a 32-byte header followed by the codec payload; see
``docs/protocol.md`` ("Packed tensor format") for layouts, value sets and error
bounds.

Invariants shared by every function here:

* Inputs are read in place (zero copy) when they are contiguous CPU tensors;
  anything else is first made contiguous (one copy), never modified.
* ``encode`` output depends only on the values, the options and
  ``element_offset``: not on thread count, SIMD level or machine. Encoding a
  tensor in chunks that start at block boundaries (``element_offset`` = the
  chunk's first element index) gives the same payload bytes as encoding it
  whole, stochastic rounding included.
* Failures raise and leave no partial result the caller could mistake for a
  valid one: ``NonFiniteError`` (NaN/Inf input), ``DecodeError`` (invalid or
  hostile packed buffer), ``CodecError`` (bad options, value out of a format's
  range). All three are ``ValueError`` subclasses. When ``decode_into``-style
  calls fail, the caller's output tensor may have been partly written.
* The native calls release the GIL.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from peerlearn import _native

CodecError = _native.CodecError
NonFiniteError = _native.NonFiniteError
DecodeError = _native.DecodeError
HEADER_BYTES: int = _native.HEADER_BYTES
MAX_BLOCK_SIZE: int = _native.MAX_BLOCK_SIZE

__all__ = [
    "HEADER_BYTES",
    "MAX_BLOCK_SIZE",
    "Codec",
    "CodecError",
    "DecodeError",
    "NonFiniteError",
    "decode",
    "decode_accumulate",
    "encode",
    "encode_diff",
    "error_bound",
    "hash_bytes",
    "hash_tensor",
    "packed_size",
    "parse_header",
    "set_simd",
    "simd_level",
]


class Codec(IntEnum):
    """Codec ids; the values are the wire values (``plcodec::Codec``)."""

    RAW = 0
    FP16 = 1
    BF16 = 2
    INT8_ABSMAX = 3
    INT8_MINMAX = 4
    INT4_ABSMAX = 5
    INT4_MINMAX = 6
    E3M0 = 7
    FP8_E4M3 = 8


BLOCK_CODECS = frozenset(
    {Codec.INT8_ABSMAX, Codec.INT8_MINMAX, Codec.INT4_ABSMAX, Codec.INT4_MINMAX, Codec.E3M0,
     Codec.FP8_E4M3})

# What users type (CLI, configs): "none" sends raw fp32; the rest name a codec.
CODEC_NAMES: dict[str, Codec | None] = {
    "none": None, "fp16": Codec.FP16, "bf16": Codec.BF16, "int8": Codec.INT8_ABSMAX,
    "int8-minmax": Codec.INT8_MINMAX, "int4": Codec.INT4_ABSMAX,
    "int4-minmax": Codec.INT4_MINMAX, "e3m0": Codec.E3M0, "fp8": Codec.FP8_E4M3,
}


def codec_from_name(name: str) -> Codec | None:
    """The codec a user-facing name stands for; ValueError for an unknown name."""
    try:
        return CODEC_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; one of {', '.join(CODEC_NAMES)}") from None


_DTYPE_IDS = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_ID_DTYPES = {v: k for k, v in _DTYPE_IDS.items()}


def _dtype_id(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_IDS[dtype]
    except KeyError:
        raise TypeError(f"codecs take float32, bfloat16 or float16 tensors, not {dtype}") from None


def _src(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError("codecs work on CPU tensors; move the tensor first")
    _dtype_id(t.dtype)
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def _packed(p):
    if isinstance(p, torch.Tensor):
        if p.dtype != torch.uint8 or p.device.type != "cpu":
            raise TypeError("a packed tensor must be a CPU uint8 tensor")
        return p.detach().reshape(-1) if p.is_contiguous() else p.detach().contiguous().reshape(-1)
    return p  # bytes, bytearray, memoryview: passed through the buffer protocol


def packed_size(numel: int, codec: Codec, dtype: torch.dtype = torch.float32,
                block_size: int = 64) -> int:
    """Bytes (header + payload) of ``numel`` elements of ``dtype`` packed with ``codec``."""
    return _native.packed_size(int(codec), _dtype_id(dtype), int(numel), int(block_size))


def _encode(a, b, codec, block_size, stochastic, seed, element_offset, threads, out):
    a = _src(a)
    if b is not None:
        b = _src(b)
        if b.dtype != a.dtype or b.numel() != a.numel():
            raise ValueError("encode_diff needs tensors of the same dtype and numel")
    size = packed_size(a.numel(), codec, a.dtype, block_size)
    if out is None:
        out = torch.empty(size, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < size:
        raise ValueError(f"out must be a contiguous uint8 tensor of at least {size} bytes")
    n = _native.encode_into(a, out.reshape(-1), int(codec), int(block_size), bool(stochastic),
                            int(seed) & (2**64 - 1), int(element_offset), int(threads), b)
    return out.reshape(-1)[:n]


def encode(tensor: torch.Tensor, codec: Codec, *, block_size: int = 64, stochastic: bool = False,
           seed: int = 0, element_offset: int = 0, threads: int = 0,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack ``tensor`` (float32/bfloat16/float16, any shape, read flattened) with ``codec``.

    Returns a 1-D uint8 tensor the caller owns (a view of ``out`` when given).
    ``block_size`` (1..MAX_BLOCK_SIZE) applies to block codecs and is ignored
    by RAW/FP16/BF16. ``stochastic`` rounds element ``i`` up with probability
    equal to its distance from the lower representable value, drawing from a
    counter-based generator keyed by ``(seed, element_offset + i)``.
    ``threads <= 0`` picks a default from the core count and tensor size.
    Raises NonFiniteError on NaN/Inf input and CodecError on invalid options.
    """
    return _encode(tensor, None, codec, block_size, stochastic, seed, element_offset, threads,
                   out)


def encode_diff(a: torch.Tensor, b: torch.Tensor, codec: Codec, *, block_size: int = 64,
                stochastic: bool = False, seed: int = 0, element_offset: int = 0,
                threads: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``encode(a - b, ...)`` without materialising ``a - b``.

    The difference is computed in float32 per element (for RAW of a 16-bit
    dtype it is then rounded back to that dtype, as torch's ``a - b`` does).
    The header records ``a``'s dtype. Raises NonFiniteError when ``a - b``
    overflows.
    """
    return _encode(a, b, codec, block_size, stochastic, seed, element_offset, threads, out)


def parse_header(packed) -> dict:
    """Validate ``packed``'s header against its length; returns the header fields.

    Keys: codec, codec_name, dtype (torch dtype), flags, stochastic,
    block_size, numel, payload_bytes. Raises DecodeError.
    """
    h = _native.parse_header(_packed(packed))
    h["codec"] = Codec(h["codec"])
    h["dtype"] = _ID_DTYPES[h["dtype"]]
    return h


def decode(packed, out: torch.Tensor | None = None, dtype: torch.dtype | None = None, *,
           threads: int = 0) -> torch.Tensor:
    """Unpack ``packed`` (uint8 tensor or bytes-like).

    Without ``out`` returns a new 1-D tensor of ``dtype`` (default: the encoded
    tensor's dtype). With ``out`` (contiguous CPU float32/bfloat16/float16 of
    the same numel, any shape) decodes into it in place and returns it.
    Values are computed in float32 and rounded to nearest even for 16-bit
    outputs. Raises DecodeError on invalid input, CodecError if a value does
    not fit a float16 output.
    """
    packed = _packed(packed)
    if out is None:
        h = _native.parse_header(packed)
        dtype = dtype if dtype is not None else _ID_DTYPES[h["dtype"]]
        _dtype_id(dtype)
        out = torch.empty(h["numel"], dtype=dtype)
    elif not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("out must be a contiguous CPU tensor")
    _native.decode_into(packed, out.detach(), int(threads))
    return out


def decode_accumulate(packed, acc: torch.Tensor, *, threads: int = 0) -> torch.Tensor:
    """``acc += decode(packed)`` in float32, in place, without a temporary tensor.

    ``acc`` must be a contiguous CPU float32 tensor of the packed numel; it is
    returned. Each element gets exactly one float32 addition, so the result
    equals ``acc + decode(packed, dtype=torch.float32)``. On DecodeError some
    blocks of ``acc`` may already have been updated.
    """
    if acc.dtype != torch.float32 or not acc.is_contiguous() or acc.device.type != "cpu":
        raise TypeError("acc must be a contiguous CPU float32 tensor")
    _native.decode_accumulate(_packed(packed), acc.detach(), int(threads))
    return acc


def hash_bytes(data, seed: int = 0) -> int:
    """XXH64 of a bytes-like object (or contiguous array) with ``seed``."""
    return _native.xxh64(data, int(seed) & (2**64 - 1))


def hash_tensor(t: torch.Tensor, seed: int = 0) -> int:
    """XXH64 of the raw bytes of ``t`` (any dtype, incl. bfloat16), in memory order.

    Equal tensors of equal dtype hash equal on every peer; the shape is not
    hashed. A non-contiguous tensor is hashed as its contiguous copy.
    """
    t = t.detach()
    if t.device.type != "cpu":
        raise ValueError("hash_tensor needs a CPU tensor")
    t = t.contiguous().reshape(-1)
    return _native.xxh64(t.view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8),
                         int(seed) & (2**64 - 1))


def set_simd(enabled: bool) -> None:
    """``False`` forces the baseline (non-AVX2) kernels; they produce identical bytes."""
    _native.set_simd(bool(enabled))


def simd_level() -> str:
    return _native.simd_level()


_TINY = 2.0 ** -100
_FP_SLACK = 2.0 ** -18  # covers the float32 rounding of scale, inverse and products


def error_bound(codec: Codec, x: torch.Tensor, *, block_size: int = 64,
                stochastic: bool = False) -> torch.Tensor:
    """Per-element bound on ``|decode(encode(x)) - x|`` (float32 output), as float64.

    ``x`` is read flattened (for encode_diff pass ``a - b`` computed in
    float32). Deterministic bounds (``m`` = block absmax, ``r`` = block
    max - min, ``T`` = 2^-100, blocks with m or r below T decode to 0 / min):

    * RAW: 0;  FP16: max(|x|·2^-11, 2^-25);  BF16: max(|x|·2^-8, 2^-134)
    * INT8_ABSMAX: m/254;  INT4_ABSMAX: m/14;  INT8_MINMAX: r/510;  INT4_MINMAX: r/30
    * E3M0: max(|x|/3, m/128)  (round to the nearest of 0, m·2^-6 .. m·2^0)
    * FP8_E4M3: max(|x|/16, m/(448·1024))

    each plus (m + |x|)·2^-18 (r + |x| + |min|)·2^-18 for float32 rounding, and at
    least T. Stochastic rounding can land on either neighbour: the quantisation
    term doubles (E3M0: max(|x|, m/64)).
    """
    codec = Codec(codec)
    x = x.detach().reshape(-1).to(torch.float64)
    ax = x.abs()
    k = 2.0 if stochastic else 1.0
    if codec == Codec.RAW:
        return torch.zeros_like(x)
    if codec == Codec.FP16:
        return torch.clamp(ax * 2.0 ** -11, min=2.0 ** -25) * k
    if codec == Codec.BF16:
        return torch.clamp(ax * 2.0 ** -8, min=2.0 ** -134) * k
    n = x.numel()
    pad = (-n) % block_size
    xb = torch.nn.functional.pad(x, (0, pad)).view(-1, block_size)
    valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, pad)).view(-1, block_size)
    big = torch.finfo(torch.float64).max
    m = xb.abs().amax(1, keepdim=True).expand_as(xb).reshape(-1)[:n]
    mx = torch.where(valid, xb, -big).amax(1, keepdim=True).expand_as(xb).reshape(-1)[:n]
    mn = torch.where(valid, xb, big).amin(1, keepdim=True).expand_as(xb).reshape(-1)[:n]
    r = mx - mn
    if codec == Codec.INT8_ABSMAX:
        q = m / 254
    elif codec == Codec.INT4_ABSMAX:
        q = m / 14
    elif codec == Codec.INT8_MINMAX:
        q = r / 510
    elif codec == Codec.INT4_MINMAX:
        q = r / 30
    elif codec == Codec.E3M0:
        q = torch.maximum(ax / 3, m / 128) if not stochastic else torch.maximum(ax, m / 64) / 2
    else:
        q = torch.maximum(ax / 16, m / (448 * 1024))
    slack = (m + r + ax + mn.abs()) * _FP_SLACK
    return torch.clamp(q * k + slack, min=_TINY)
