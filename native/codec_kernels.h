// Codec kernels. No include guard on purpose: codec.cpp includes this file
// twice, once for the baseline ISA and once under target("avx2"), inside
// different namespaces (PLC_KNS). Both copies are the same source, so they
// perform the same IEEE float operations in the same order on every element;
// only the vector width differs, which cannot change a per-element result
// (there are no float reductions: absmax/min/max run on integer bit patterns,
// and FMA is never enabled). That is what makes the bytes identical across
// paths and machines.
//
// Requires: codec_internal.h, <algorithm>, <vector> included beforehand.

namespace plcodec {
namespace PLC_KNS {
using namespace ::plcodec::detail;

// ---------------------------------------------------------------- scalar helpers

// Round to nearest even for |y| < 2^22: adding 1.5*2^23 leaves the rounded
// integer in the low mantissa bits. Exact, branch-free, vectorises at SSE2.
static inline int32_t rne_int(float y) {
  return int32_t(f2u(y + 12582912.0f)) - 0x4B400000;
}
static inline int32_t floor_int(float y) {
  int32_t r = rne_int(y);
  return r - (float(r) > y ? 1 : 0);
}
static inline int32_t clampi(int32_t v, int32_t lo, int32_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}
static inline float urand(uint64_t key, uint64_t idx) {
  return float(mix64(key + idx * kGolden) >> 40) * 0x1p-24f;
}
// A sortable int32 for a float: order matches the numeric order of finite
// floats; +NaN sorts above +Inf and -NaN below -Inf.
static inline int32_t sortable(float f) {
  int32_t i = int32_t(f2u(f));
  return i ^ ((i >> 31) & 0x7FFFFFFF);
}
static inline float unsortable(int32_t s) { return u2f(uint32_t(s ^ ((s >> 31) & 0x7FFFFFFF))); }

static inline float h2f(uint16_t h) {
  uint32_t o = uint32_t(h & 0x7FFF) << 13;
  uint32_t e = o & (0x7C00u << 13);
  o += (127u - 15u) << 23;
  uint32_t o_inf = o + ((128u - 16u) << 23);
  // Subnormal halves: renormalise with an exact float subtraction.
  uint32_t o_sub = f2u(u2f(o + (1u << 23)) - u2f(113u << 23));
  o = e == (0x7C00u << 13) ? o_inf : (e == 0 ? o_sub : o);
  return u2f(o | (uint32_t(h & 0x8000) << 16));
}
// float -> half, round to nearest even. Finite input; values >= 65520 give
// 0x7C00 (Inf), which callers treat as overflow.
static inline uint16_t f2h(float f) {
  uint32_t u = f2u(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // |f| < 2^-14: adding 0.5 rounds to a multiple of 2^-24 (the half subnormal step).
  uint32_t o_sub = f2u(u2f(u) + 0.5f) - f2u(0.5f);
  uint32_t o_norm = (u + ((15u - 127u) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
  uint32_t o = u < (113u << 23) ? o_sub : o_norm;
  o = u >= (143u << 23) ? 0x7C00u : o;
  return uint16_t(o | (sign >> 16));
}
static inline float b2f(uint16_t b) { return u2f(uint32_t(b) << 16); }
static inline uint16_t f2b(float f) {
  uint32_t u = f2u(f);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
// float -> OCP e4m3fn magnitude code, round to nearest even, saturating at 448
// (0x7E). u = |y| bits, finite.
static inline uint32_t f2e4m3(uint32_t u) {
  // |y| < 2^-6: adding 2^14 rounds to a multiple of 2^-9 (the e4m3 subnormal step).
  uint32_t o_sub = f2u(u2f(u) + 16384.0f) - f2u(16384.0f);
  uint32_t o_norm = (u + ((7u - 127u) << 23) + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;
  uint32_t o = u < (121u << 23) ? o_sub : o_norm;
  return o > 0x7Eu ? 0x7Eu : o;
}
// Stochastic rounding of |x| (bits u, finite) to a float format with m
// mantissa bits and exponent bias `bias`: the magnitude is split into a
// significand M and a count s of bits the format cannot hold; adding s random
// bits before the shift rounds up with probability exactly (dropped part)/step.
// Returns the target format's magnitude bits (carries propagate into the
// exponent, so the result may be the format's Inf pattern: callers check).
static inline uint32_t sr_float(uint32_t u, int m, int bias, uint64_t r) {
  int E = int(u >> 23);
  uint64_t M = u & 0x7FFFFFu;
  if (E == 0) E = 1; else M |= 0x800000u;
  int e = E - 127, emin = 1 - bias;
  int s = (23 - m) + (e < emin ? emin - e : 0);
  uint64_t k = s >= 64 ? 0 : (M + (r & ((uint64_t(1) << s) - 1))) >> s;
  if (e < emin) return uint32_t(k);
  return uint32_t((uint64_t(e + bias) << m) + k - (uint64_t(1) << m));
}

static inline void st32(uint8_t* p, float f) { std::memcpy(p, &f, 4); }
static inline float ld32(const uint8_t* p) { float f; std::memcpy(&f, p, 4); return f; }

// ---------------------------------------------------------------- block statistics

static inline uint32_t absmax_bits(const float* x, uint32_t n) {
  uint32_t m = 0;
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t a = f2u(x[i]) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  return m;
}
// Returns false on non-finite input.
static inline bool minmax(const float* x, uint32_t n, float& mn, float& mx) {
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  for (uint32_t i = 0; i < n; ++i) {
    int32_t s = sortable(x[i]);
    lo = s < lo ? s : lo;
    hi = s > hi ? s : hi;
  }
  if (hi >= 0x7F800000 || lo <= int32_t(0x807FFFFF)) return false;
  mn = unsortable(lo);
  mx = unsortable(hi);
  return true;
}

// ---------------------------------------------------------------- block encoders

#ifdef PLC_INT8_SIMD
#include "codec_int8_avx2.h"
#endif

// Symmetric int codecs: scale = absmax/qmax, q = round(x * (qmax/absmax)).
template <int QMAX>
static inline int enc_absmax(const float* x, uint32_t n, float& scale, float& inv) {
  uint32_t am = absmax_bits(x, n);
  if (am >= 0x7F800000u) return kNonFinite;
  float a = u2f(am);
  scale = 0.0f, inv = 0.0f;
  if (a >= kTiny) scale = a / float(QMAX), inv = float(QMAX) / a;
  return kOk;
}
template <int QMAX>
static inline int enc_minmax(const float* x, uint32_t n, float& mn, float& scale, float& inv) {
  float mx;
  if (!minmax(x, n, mn, mx)) return kNonFinite;
  float range = mx - mn;
  if (!(range <= 3.4028234663852886e38f)) return kRangeOverflow;
  scale = 0.0f, inv = 0.0f;
  if (range >= kTiny) scale = range / float(QMAX), inv = float(QMAX) / range;
  return kOk;
}

// One quantised value per element into q[0..n): symmetric (MN unused) or
// offset by mn. Stochastic: q = floor(y) + (u < y - floor(y)).
template <bool MINMAX>
static inline void quantize(const float* x, uint32_t n, float mn, float inv, int32_t lo,
                            int32_t hi, const EncJob& j, uint64_t idx0, int8_t* q8,
                            uint8_t* u8) {
  if (!j.sr) {
    for (uint32_t i = 0; i < n; ++i) {
      float y = MINMAX ? (x[i] - mn) * inv : x[i] * inv;
      int32_t v = clampi(rne_int(y), lo, hi);
      if (MINMAX) u8[i] = uint8_t(v); else q8[i] = int8_t(v);
    }
  } else {
    for (uint32_t i = 0; i < n; ++i) {
      float y = MINMAX ? (x[i] - mn) * inv : x[i] * inv;
      int32_t f = floor_int(y);
      int32_t v = clampi(f + (urand(j.key, idx0 + i) < y - float(f) ? 1 : 0), lo, hi);
      if (MINMAX) u8[i] = uint8_t(v); else q8[i] = int8_t(v);
    }
  }
}

static inline void pack_nibbles(const uint8_t* v, uint32_t n, uint8_t* out) {
  uint32_t h = n / 2;
  for (uint32_t k = 0; k < h; ++k) out[k] = uint8_t((v[2 * k] & 15u) | (v[2 * k + 1] << 4));
  if (n & 1) out[h] = uint8_t(v[n - 1] & 15u);
}

static inline uint8_t e3m0_code(float t) {
  return uint8_t((t >= 0.5f) + (t >= 1.5f) + (t >= 3.0f) + (t >= 6.0f) + (t >= 12.0f) +
                 (t >= 24.0f) + (t >= 48.0f));
}
// Stochastic: between adjacent levels lo <= t < hi (levels 0,1,2,4..64) round
// up with probability (t - lo)/(hi - lo); hi - lo is a power of two, so the
// fraction is computed exactly.
static inline uint8_t e3m0_code_sr(float t, float u) {
  int e = (t >= 1.0f) + (t >= 2.0f) + (t >= 4.0f) + (t >= 8.0f) + (t >= 16.0f) + (t >= 32.0f) +
          (t >= 64.0f);
  if (e >= 7) return 7;
  float lo = e == 0 ? 0.0f : u2f(uint32_t(127 + e - 1) << 23);
  float w = e == 0 ? 1.0f : lo;
  return uint8_t(e + (u < (t - lo) / w ? 1 : 0));
}

static int enc_block(const float* x, uint32_t n, uint8_t* rec, const EncJob& j, uint64_t idx0,
                     uint8_t* tmp) {
  float scale, inv, mn;
  int st;
  switch (j.codec) {
    case Codec::INT8_ABSMAX:
#ifdef PLC_INT8_SIMD
      if (!j.sr) return enc_int8_absmax_simd(x, n, rec);
#endif
      if ((st = enc_absmax<127>(x, n, scale, inv))) return st;
      st32(rec, scale);
      quantize<false>(x, n, 0.0f, inv, -127, 127, j, idx0, reinterpret_cast<int8_t*>(rec + 4),
                      nullptr);
      return kOk;
    case Codec::INT8_MINMAX:
      if ((st = enc_minmax<255>(x, n, mn, scale, inv))) return st;
      st32(rec, mn), st32(rec + 4, scale);
      quantize<true>(x, n, mn, inv, 0, 255, j, idx0, nullptr, rec + 8);
      return kOk;
    case Codec::INT4_ABSMAX:
      if ((st = enc_absmax<7>(x, n, scale, inv))) return st;
      st32(rec, scale);
      quantize<false>(x, n, 0.0f, inv, -7, 7, j, idx0, reinterpret_cast<int8_t*>(tmp), nullptr);
      pack_nibbles(tmp, n, rec + 4);
      return kOk;
    case Codec::INT4_MINMAX:
      if ((st = enc_minmax<15>(x, n, mn, scale, inv))) return st;
      st32(rec, mn), st32(rec + 4, scale);
      quantize<true>(x, n, mn, inv, 0, 15, j, idx0, nullptr, tmp);
      pack_nibbles(tmp, n, rec + 8);
      return kOk;
    case Codec::E3M0: {
      uint32_t am = absmax_bits(x, n);
      if (am >= 0x7F800000u) return kNonFinite;
      float a = u2f(am);
      scale = a >= kTiny ? a : 0.0f;
      inv = a >= kTiny ? 64.0f / a : 0.0f;
      st32(rec, scale);
      // Separate loops so the deterministic one vectorises.
      if (!j.sr) {
        for (uint32_t i = 0; i < n; ++i) {
          uint32_t u = f2u(x[i]);
          uint32_t c = e3m0_code(u2f(u & 0x7FFFFFFFu) * inv);
          tmp[i] = uint8_t(c | (c ? (u >> 31) << 3 : 0u));
        }
      } else {
        for (uint32_t i = 0; i < n; ++i) {
          uint32_t u = f2u(x[i]);
          uint32_t c = e3m0_code_sr(u2f(u & 0x7FFFFFFFu) * inv, urand(j.key, idx0 + i));
          tmp[i] = uint8_t(c | (c ? (u >> 31) << 3 : 0u));
        }
      }
      pack_nibbles(tmp, n, rec + 4);
      return kOk;
    }
    case Codec::FP8_E4M3: {
      if ((st = enc_absmax<448>(x, n, scale, inv))) return st;
      st32(rec, scale);
      uint8_t* q = rec + 4;
      if (!j.sr) {
        for (uint32_t i = 0; i < n; ++i) {
          uint32_t u = f2u(x[i] * inv);
          uint32_t c = f2e4m3(u & 0x7FFFFFFFu);
          q[i] = uint8_t(c | (c ? (u >> 31) << 7 : 0u));
        }
      } else {
        for (uint32_t i = 0; i < n; ++i) {
          uint32_t u = f2u(x[i] * inv);
          uint32_t c = sr_float(u & 0x7FFFFFFFu, 3, 7, mix64(j.key + (idx0 + i) * kGolden));
          c = c > 0x7Eu ? 0x7Eu : c;
          q[i] = uint8_t(c | (c ? (u >> 31) << 7 : 0u));
        }
      }
      return kOk;
    }
    default:
      return kOk;  // flat codecs never reach here
  }
}

// Flat codecs: x holds the values as float32 (already a - b when diffing).
static int enc_flat(const float* x, uint32_t n, uint8_t* out, const EncJob& j, uint64_t idx0) {
  if (absmax_bits(x, n) >= 0x7F800000u) return kNonFinite;
  DType target = j.codec == Codec::FP16 ? DType::F16
                 : j.codec == Codec::BF16 ? DType::BF16 : j.dt;
  if (target == DType::F32) {
    std::memcpy(out, x, size_t(n) * 4);
    return kOk;
  }
  uint16_t bad = 0;
  uint16_t tmp[256];
  bool sr = j.sr && j.codec != Codec::RAW;
  for (uint32_t i0 = 0; i0 < n; i0 += 256) {
    uint32_t m = std::min<uint32_t>(256, n - i0);
    const float* xs = x + i0;
    if (target == DType::F16) {
      if (!sr) {
        for (uint32_t i = 0; i < m; ++i) tmp[i] = f2h(xs[i]);
      } else {
        for (uint32_t i = 0; i < m; ++i) {
          uint32_t u = f2u(xs[i]);
          uint32_t c = sr_float(u & 0x7FFFFFFFu, 10, 15, mix64(j.key + (idx0 + i0 + i) * kGolden));
          tmp[i] = uint16_t((c > 0x7C00u ? 0x7C00u : c) | ((u >> 16) & 0x8000u));
        }
      }
      for (uint32_t i = 0; i < m; ++i) bad |= uint16_t((tmp[i] & 0x7FFF) >= 0x7C00);
    } else {
      if (!sr) {
        for (uint32_t i = 0; i < m; ++i) tmp[i] = f2b(xs[i]);
      } else {
        for (uint32_t i = 0; i < m; ++i) {
          uint32_t u = f2u(xs[i]);
          uint32_t c = sr_float(u & 0x7FFFFFFFu, 7, 127, mix64(j.key + (idx0 + i0 + i) * kGolden));
          tmp[i] = uint16_t((c > 0x7F80u ? 0x7F80u : c) | ((u >> 16) & 0x8000u));
        }
      }
      for (uint32_t i = 0; i < m; ++i) bad |= uint16_t((tmp[i] & 0x7FFF) >= 0x7F80);
    }
    std::memcpy(out + size_t(i0) * 2, tmp, size_t(m) * 2);
  }
  return bad ? kOverflow : kOk;
}

// ---------------------------------------------------------------- loading inputs

template <DType DT>
static inline float load1(const void* p, uint64_t i) {
  if (DT == DType::F32) return static_cast<const float*>(p)[i];
  if (DT == DType::BF16) return b2f(static_cast<const uint16_t*>(p)[i]);
  return h2f(static_cast<const uint16_t*>(p)[i]);
}
template <DType DT>
static void load_block(const EncJob& j, uint64_t i0, uint32_t n, float* dst) {
  if (j.b) {
    for (uint32_t i = 0; i < n; ++i) dst[i] = load1<DT>(j.a, i0 + i) - load1<DT>(j.b, i0 + i);
  } else {
    for (uint32_t i = 0; i < n; ++i) dst[i] = load1<DT>(j.a, i0 + i);
  }
}
template <DType DT>
static inline bool raw_nonfinite(const void* p, uint64_t i0, uint32_t n) {
  if (DT == DType::F32) return absmax_bits(static_cast<const float*>(p) + i0, n) >= 0x7F800000u;
  const uint16_t* h = static_cast<const uint16_t*>(p) + i0;
  uint16_t lim = DT == DType::BF16 ? 0x7F80 : 0x7C00, m = 0;
  for (uint32_t i = 0; i < n; ++i) {
    uint16_t a = h[i] & 0x7FFF;
    m = a > m ? a : m;
  }
  return m >= lim;
}

template <DType DT>
static Result encode_range_t(const EncJob& j, uint64_t b0, uint64_t b1) {
  const bool flat = !codec_uses_blocks(j.codec);
  const uint64_t rec = record_bytes(j.codec, j.dt, j.bs);
  std::vector<float> scratch;
  std::vector<uint8_t> tmp;
  const bool direct = DT == DType::F32 && !j.b;
  if (!direct) scratch.resize(std::min<uint64_t>(j.bs, j.numel));
  if (!flat) tmp.resize(std::min<uint64_t>(j.bs, j.numel));
  for (uint64_t b = b0; b < b1; ++b) {
    uint64_t i0 = b * j.bs;
    uint32_t n = uint32_t(std::min<uint64_t>(j.bs, j.numel - i0));
    uint8_t* out = j.payload + b * rec;
    int st;
    if (flat && j.codec == Codec::RAW && !j.b) {
      // Bytes travel unchanged; only the finiteness check touches values.
      if (raw_nonfinite<DT>(j.a, i0, n)) return {kNonFinite, b};
      const size_t es = DT == DType::F32 ? 4 : 2;
      std::memcpy(out, static_cast<const uint8_t*>(j.a) + i0 * es, size_t(n) * es);
      continue;
    }
#ifdef PLC_INT8_SIMD
    if (direct && j.codec == Codec::INT8_ABSMAX && !j.sr) {
      uint64_t nb = std::min<uint64_t>(8, b1 - b);
      uint32_t last = uint32_t(std::min<uint64_t>(j.bs, j.numel - (b + nb - 1) * j.bs));
      int bad = enc_int8_absmax_group(static_cast<const float*>(j.a) + i0, uint32_t(nb), j.bs,
                                      last, out);
      if (bad >= 0) return {kNonFinite, b + uint64_t(bad)};
      b += nb - 1;
      continue;
    }
#endif
    const float* x;
    if (direct) {
      x = static_cast<const float*>(j.a) + i0;
    } else {
      load_block<DT>(j, i0, n, scratch.data());
      x = scratch.data();
    }
    st = flat ? enc_flat(x, n, out, j, j.elem_offset + i0)
              : enc_block(x, n, out, j, j.elem_offset + i0, tmp.data());
    if (st) return {st, b};
  }
  return {};
}

static Result encode_range(const EncJob& j, uint64_t b0, uint64_t b1) {
  switch (j.dt) {
    case DType::F32: return encode_range_t<DType::F32>(j, b0, b1);
    case DType::BF16: return encode_range_t<DType::BF16>(j, b0, b1);
    default: return encode_range_t<DType::F16>(j, b0, b1);
  }
}

// ---------------------------------------------------------------- decoders

// Checks a stored scale (and min) so that every code decodes to a finite value.
static inline bool scale_ok(float scale, float qmax, float mn = 0.0f, bool has_min = false) {
  uint32_t sb = f2u(scale);
  if (sb >= 0x7F800000u) return false;  // negative (incl. -0), Inf or NaN
  if (!(scale * qmax <= 3.4028234663852886e38f)) return false;
  if (has_min) {
    if (!(mn >= -3.4028234663852886e38f && mn <= 3.4028234663852886e38f)) return false;
    float top = mn + qmax * scale;
    if (!(top <= 3.4028234663852886e38f)) return false;
  }
  return true;
}


// Decodes one block/chunk into float32 y[0..n).
static int dec_block(const DecJob& j, const uint8_t* rec, uint32_t n, float* y) {
  const uint8_t* q = rec;
  float scale, mn;
  switch (j.codec) {
    case Codec::RAW: {
      if (j.src == DType::F32) {
        std::memcpy(y, rec, size_t(n) * 4);
        return absmax_bits(y, n) >= 0x7F800000u ? kNonFinitePayload : kOk;
      }
      [[fallthrough]];
    }
    case Codec::FP16:
    case Codec::BF16: {
      bool half = j.codec == Codec::FP16 || (j.codec == Codec::RAW && j.src == DType::F16);
      uint16_t m = 0;
      for (uint32_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, rec + 2 * size_t(i), 2);
        uint16_t a = h & 0x7FFF;
        m = a > m ? a : m;
        y[i] = half ? h2f(h) : b2f(h);
      }
      return m >= (half ? 0x7C00 : 0x7F80) ? kNonFinitePayload : kOk;
    }
    case Codec::INT8_ABSMAX: {
      scale = ld32(rec);
      if (!scale_ok(scale, 128.0f)) return kBadScale;
      const int8_t* s8 = reinterpret_cast<const int8_t*>(rec + 4);
      uint32_t i = 0;
#ifdef PLC_INT8_SIMD
      i = dec_int8_simd(s8, n, scale, y);
#endif
      for (; i < n; ++i) y[i] = float(s8[i]) * scale;
      return kOk;
    }
    case Codec::INT8_MINMAX: {
      mn = ld32(rec), scale = ld32(rec + 4);
      if (!scale_ok(scale, 255.0f, mn, true)) return kBadScale;
      q = rec + 8;
      for (uint32_t i = 0; i < n; ++i) y[i] = mn + float(q[i]) * scale;
      return kOk;
    }
    case Codec::INT4_ABSMAX:
    case Codec::INT4_MINMAX:
    case Codec::E3M0: {
      bool mm = j.codec == Codec::INT4_MINMAX;
      if (mm) mn = ld32(rec), scale = ld32(rec + 4), q = rec + 8;
      else mn = 0.0f, scale = ld32(rec), q = rec + 4;
      float qmax = mm ? 15.0f : (j.codec == Codec::E3M0 ? 1.0f : 8.0f);
      if (!scale_ok(scale, qmax, mn, mm)) return kBadScale;
      if ((n & 1) && (q[n / 2] >> 4)) return kBadPadding;
      uint32_t h = n / 2;
      if (j.codec == Codec::E3M0) {
        for (uint32_t k = 0; k < h; ++k) {
          y[2 * k] = kLuts.e3m0[q[k] & 15] * scale;
          y[2 * k + 1] = kLuts.e3m0[q[k] >> 4] * scale;
        }
        if (n & 1) y[n - 1] = kLuts.e3m0[q[h] & 15] * scale;
      } else if (mm) {
        for (uint32_t k = 0; k < h; ++k) {
          y[2 * k] = mn + float(q[k] & 15) * scale;
          y[2 * k + 1] = mn + float(q[k] >> 4) * scale;
        }
        if (n & 1) y[n - 1] = mn + float(q[h] & 15) * scale;
      } else {
        for (uint32_t k = 0; k < h; ++k) {
          y[2 * k] = float(int32_t((q[k] & 15) ^ 8) - 8) * scale;
          y[2 * k + 1] = float(int32_t((q[k] >> 4) ^ 8) - 8) * scale;
        }
        if (n & 1) y[n - 1] = float(int32_t((q[h] & 15) ^ 8) - 8) * scale;
      }
      return kOk;
    }
    case Codec::FP8_E4M3: {
      scale = ld32(rec);
      if (!scale_ok(scale, 448.0f)) return kBadScale;
      q = rec + 4;
      uint8_t nan = 0;
      for (uint32_t i = 0; i < n; ++i) {
        nan |= uint8_t((q[i] & 0x7F) == 0x7F);
        y[i] = kLuts.e4m3[q[i]] * scale;
      }
      return nan ? kBadCode : kOk;
    }
  }
  return kOk;
}

static Result decode_range(const DecJob& j, uint64_t b0, uint64_t b1) {
  const uint64_t rec = record_bytes(j.codec, j.src, j.bs);
  const bool direct = j.out_dt == DType::F32 && !j.accumulate;
  std::vector<float> scratch;
  if (!direct) scratch.resize(std::min<uint64_t>(j.bs, j.numel));
  for (uint64_t b = b0; b < b1; ++b) {
    uint64_t i0 = b * j.bs;
    uint32_t n = uint32_t(std::min<uint64_t>(j.bs, j.numel - i0));
    float* y = direct ? static_cast<float*>(j.out) + i0 : scratch.data();
    if (int st = dec_block(j, j.payload + b * rec, n, y)) return {st, b};
    if (direct) continue;
    if (j.accumulate) {
      float* acc = static_cast<float*>(j.out) + i0;
      for (uint32_t i = 0; i < n; ++i) acc[i] = acc[i] + y[i];
    } else if (j.out_dt == DType::BF16) {
      uint16_t* o = static_cast<uint16_t*>(j.out) + i0;
      uint16_t m = 0;
      for (uint32_t i = 0; i < n; ++i) {
        o[i] = f2b(y[i]);
        uint16_t a = o[i] & 0x7FFF;
        m = a > m ? a : m;
      }
      if (m >= 0x7F80) return {kOutOverflow, b};
    } else {
      uint16_t* o = static_cast<uint16_t*>(j.out) + i0;
      uint16_t m = 0;
      for (uint32_t i = 0; i < n; ++i) {
        o[i] = f2h(y[i]);
        uint16_t a = o[i] & 0x7FFF;
        m = a > m ? a : m;
      }
      if (m >= 0x7C00) return {kOutOverflow, b};
    }
  }
  return {};
}

}  // namespace PLC_KNS
}  // namespace plcodec
