// Types shared by the codec driver (codec.cpp) and the kernels
// (codec_kernels.h), which are compiled once per instruction set.
#pragma once

#include <cstdint>
#include <cstring>

#include "codec.h"

namespace plcodec {
namespace detail {

// Blocks whose absmax (or max-min range) is below this are stored with scale 0
// and decode to exact zeros (or to the block min). Keeping every non-zero
// scale far above FLT_MIN means 127/absmax, 448/absmax, ... never overflow and
// scales are never subnormal; the absolute error this adds is < 2^-100.
constexpr float kTiny = 0x1p-100f;

// RAW / FP16 / BF16 have no blocks; the driver splits them into chunks of this
// many elements so threads and scratch buffers work as for block codecs.
constexpr uint32_t kFlatChunk = 4096;

enum Status : int {
  kOk = 0,
  kNonFinite = 1,      // encode: NaN/Inf in the input (or in a - b)
  kOverflow = 2,       // encode: value out of the target format's range
  kRangeOverflow = 3,  // encode: max - min of a block overflows float32
  kBadScale = 10,      // decode: scale/min NaN, Inf, negative, or qmax*scale overflows
  kBadPadding = 11,    // decode: unused high nibble of an odd-length block is not 0
  kBadCode = 12,       // decode: FP8 NaN code (0x7F / 0xFF)
  kNonFinitePayload = 13,  // decode: RAW/FP16/BF16 payload holds NaN/Inf
  kOutOverflow = 14,   // decode: value does not fit the requested output dtype
};

struct Result {
  int status = kOk;
  uint64_t block = 0;  // first failing block (chunk for flat codecs)
};

struct EncJob {
  Codec codec;
  DType dt;
  const void* a;
  const void* b;  // nullptr unless encoding a - b
  uint64_t numel;
  uint32_t bs;    // block size, or kFlatChunk for flat codecs
  bool sr;
  uint64_t key;   // mixed seed for stochastic rounding
  uint64_t elem_offset;
  uint8_t* payload;
};

struct DecJob {
  Codec codec;
  DType src;
  const uint8_t* payload;
  uint64_t numel;
  uint32_t bs;
  void* out;
  DType out_dt;
  bool accumulate;  // out is float32 and receives out[i] += decoded[i]
};

// Bytes one block of n elements occupies in the payload (scales + codes).
inline uint64_t record_bytes(Codec c, DType src, uint64_t n) {
  switch (c) {
    case Codec::RAW: return n * dtype_size(src);
    case Codec::FP16:
    case Codec::BF16: return n * 2;
    case Codec::INT8_ABSMAX: return 4 + n;
    case Codec::INT8_MINMAX: return 8 + n;
    case Codec::INT4_ABSMAX: return 4 + (n + 1) / 2;
    case Codec::INT4_MINMAX: return 8 + (n + 1) / 2;
    case Codec::E3M0: return 4 + (n + 1) / 2;
    case Codec::FP8_E4M3: return 4 + n;
  }
  return 0;
}

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
// The per-call key; element i's random word is mix64(key + i * kGolden).
inline uint64_t sr_key(uint64_t seed) { return mix64(seed + kGolden); }

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float e4m3_value(uint32_t c) {
  uint32_t e = (c >> 3) & 15, m = c & 7;
  float v = e == 0 ? float(m) * 0x1p-9f : u2f(((e + 120u) << 23) | (m << 20));
  return (c & 0x80) ? -v : v;
}
struct Luts {
  float e4m3[256];
  float e3m0[16];
  Luts() {
    for (uint32_t c = 0; c < 256; ++c) e4m3[c] = e4m3_value(c);
    for (uint32_t c = 0; c < 16; ++c) {
      uint32_t e = c & 7;
      float v = e == 0 ? 0.0f : u2f((120u + e) << 23);
      e3m0[c] = (c & 8) ? -v : v;
    }
  }
};
// Built by baseline code at load time; the AVX2 kernels only read it.
inline const Luts kLuts;

}  // namespace detail
}  // namespace plcodec
