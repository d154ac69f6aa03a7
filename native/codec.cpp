// Codec driver: header handling, validation, size arithmetic, ISA dispatch and
// threading. The per-element work lives in codec_kernels.h.
#include "codec.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "codec_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PLC_KNS k_base
#include "codec_kernels.h"
#undef PLC_KNS

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PLC_HAVE_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
#define PLC_KNS k_avx2
#define PLC_INT8_SIMD 1
#include "codec_kernels.h"
#undef PLC_INT8_SIMD
#undef PLC_KNS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace plcodec {
using namespace detail;

namespace {

constexpr uint8_t kMagic[4] = {'P', 'L', 'Q', 0x01};

// -1: not decided yet (PEERLEARN_CODEC_SCALAR=1 in the environment forces the
// baseline path), 0: baseline, 1: AVX2.
std::atomic<int> g_isa{-1};

bool cpu_has_avx2() {
#ifdef PLC_HAVE_AVX2
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool use_avx2() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("PEERLEARN_CODEC_SCALAR");
    bool forced = env && *env && std::string(env) != "0";
    v = (!forced && cpu_has_avx2()) ? 1 : 0;
    g_isa.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

int resolve_threads(int threads, uint64_t numel, uint64_t nblocks) {
  uint64_t t;
  if (threads > 0) {
    t = std::min(threads, 256);
  } else {
    unsigned hw = std::thread::hardware_concurrency();
    t = std::min<uint64_t>(hw ? hw : 1, 32);
    // Below ~256K elements per thread, spawning costs more than it saves.
    t = std::max<uint64_t>(1, std::min<uint64_t>(t, numel >> 18));
  }
  return int(std::max<uint64_t>(1, std::min<uint64_t>(t, nblocks)));
}

// Runs f(b0, b1) over [0, nblocks) split into contiguous ranges, one per
// thread, the caller's thread taking the first. Returns the failure with the
// lowest block index so errors do not depend on scheduling.
template <class F>
Result run_parallel(uint64_t nblocks, int nthreads, F f) {
  if (nthreads <= 1) return f(0, nblocks);
  auto lo = [&](int t) { return uint64_t((unsigned __int128)nblocks * unsigned(t) / unsigned(nthreads)); };
  std::vector<Result> res(nthreads);
  std::vector<std::exception_ptr> err(nthreads);
  auto body = [&](int t) {
    try {
      res[t] = f(lo(t), lo(t + 1));
    } catch (...) {
      err[t] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t) {
    try {
      pool.emplace_back(body, t);
    } catch (const std::system_error&) {
      body(t);  // out of threads: do the range here rather than fail
    }
  }
  body(0);
  for (auto& th : pool) th.join();
  for (int t = 0; t < nthreads; ++t)
    if (err[t]) std::rethrow_exception(err[t]);
  for (int t = 0; t < nthreads; ++t)
    if (res[t].status) return res[t];
  return {};
}

bool valid_codec(uint8_t c) { return c < kCodecCount; }
bool valid_dtype(uint8_t d) { return d >= 1 && d <= 3; }

void put_u32(uint8_t* p, uint32_t v) { for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i)); }
void put_u64(uint8_t* p, uint64_t v) { for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i)); }
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

// payload size or false on overflow; block_size already validated.
bool checked_payload(Codec c, DType src, uint64_t numel, uint32_t bs, uint64_t& out) {
  if (!codec_uses_blocks(c)) return !__builtin_mul_overflow(numel, record_bytes(c, src, 1), &out);
  uint64_t full = numel / bs, tail = numel % bs, total;
  if (__builtin_mul_overflow(full, record_bytes(c, src, bs), &total)) return false;
  if (tail && __builtin_add_overflow(total, record_bytes(c, src, tail), &total)) return false;
  out = total;
  return true;
}

std::string elems(uint64_t block, uint64_t bs, uint64_t numel) {
  uint64_t i0 = block * bs, i1 = std::min(numel, i0 + bs);
  return "elements [" + std::to_string(i0) + ", " + std::to_string(i1) + ")";
}

Result encode_dispatch(const EncJob& j, uint64_t b0, uint64_t b1) {
#ifdef PLC_HAVE_AVX2
  if (use_avx2()) return k_avx2::encode_range(j, b0, b1);
#endif
  return k_base::encode_range(j, b0, b1);
}
Result decode_dispatch(const DecJob& j, uint64_t b0, uint64_t b1) {
#ifdef PLC_HAVE_AVX2
  if (use_avx2()) return k_avx2::decode_range(j, b0, b1);
#endif
  return k_base::decode_range(j, b0, b1);
}

void decode_impl(const uint8_t* buf, size_t len, void* out, DType out_dtype, uint64_t out_numel,
                 bool accumulate, int threads) {
  Header h = parse_header(buf, len);
  if (!valid_dtype(uint8_t(out_dtype))) throw CodecError("invalid output dtype");
  if (h.numel != out_numel)
    throw DecodeError("packed tensor has " + std::to_string(h.numel) +
                      " elements but the output has " + std::to_string(out_numel));
  if (h.numel == 0) return;
  if (!out) throw CodecError("null output buffer");
  DecJob j{h.codec, h.src_dtype, buf + kHeaderBytes, h.numel,
           codec_uses_blocks(h.codec) ? h.block_size : kFlatChunk, out, out_dtype, accumulate};
  uint64_t nblocks = (h.numel - 1) / j.bs + 1;
  int nt = resolve_threads(threads, h.numel, nblocks);
  Result r = run_parallel(nblocks, nt, [&](uint64_t b0, uint64_t b1) {
    return decode_dispatch(j, b0, b1);
  });
  if (!r.status) return;
  std::string where = " in " + elems(r.block, j.bs, h.numel);
  switch (r.status) {
    case kBadScale: throw DecodeError("invalid scale or min (NaN, Inf, negative or overflowing)" + where);
    case kBadPadding: throw DecodeError("non-zero padding nibble" + where);
    case kBadCode: throw DecodeError("FP8 NaN code in payload" + where);
    case kNonFinitePayload: throw DecodeError("non-finite value in payload" + where);
    case kOutOverflow: throw CodecError("decoded value overflows the output dtype" + where);
    default: throw DecodeError("decode failed" + where);
  }
}

}  // namespace

const char* codec_name(Codec c) {
  static const char* names[kCodecCount] = {"RAW",         "FP16",        "BF16",
                                           "INT8_ABSMAX", "INT8_MINMAX", "INT4_ABSMAX",
                                           "INT4_MINMAX", "E3M0",        "FP8_E4M3"};
  return valid_codec(uint8_t(c)) ? names[uint8_t(c)] : "?";
}

size_t dtype_size(DType d) { return d == DType::F32 ? 4 : d == DType::U8 ? 1 : 2; }

bool codec_uses_blocks(Codec c) {
  return c != Codec::RAW && c != Codec::FP16 && c != Codec::BF16;
}

uint64_t payload_bytes(Codec c, DType src, uint64_t numel, uint32_t block_size) {
  if (!valid_codec(uint8_t(c))) throw CodecError("unknown codec " + std::to_string(int(c)));
  if (!valid_dtype(uint8_t(src))) throw CodecError("unknown dtype " + std::to_string(int(src)));
  if (codec_uses_blocks(c) && (block_size < 1 || block_size > kMaxBlockSize))
    throw CodecError("block_size must be in [1, " + std::to_string(kMaxBlockSize) + "], got " +
                     std::to_string(block_size));
  uint64_t out;
  if (!checked_payload(c, src, numel, block_size, out))
    throw CodecError("numel " + std::to_string(numel) + " is too large");
  return out;
}

size_t encode(const void* a, const void* b, DType dtype, uint64_t numel, uint64_t element_offset,
              const EncodeOptions& opt, uint8_t* out, size_t out_cap, int threads) {
  const bool blocks = codec_uses_blocks(opt.codec);
  const uint32_t bs = blocks ? opt.block_size : 0;
  uint64_t payload = payload_bytes(opt.codec, dtype, numel, bs);
  if (payload > UINT64_MAX - kHeaderBytes || payload + kHeaderBytes > out_cap)
    throw CodecError("output buffer holds " + std::to_string(out_cap) + " bytes, need " +
                     std::to_string(payload + kHeaderBytes));
  if (numel && !a) throw CodecError("null input buffer");
  const bool sr = opt.stochastic && opt.codec != Codec::RAW;

  std::memcpy(out, kMagic, 4);
  out[4] = uint8_t(opt.codec);
  out[5] = uint8_t(dtype);
  out[6] = sr ? 1 : 0;
  out[7] = 0;
  put_u32(out + 8, bs);
  put_u32(out + 12, 0);
  put_u64(out + 16, numel);
  put_u64(out + 24, payload);
  if (numel == 0) return kHeaderBytes;

  EncJob j{opt.codec, dtype, a, b, numel, blocks ? bs : kFlatChunk, sr, sr_key(opt.seed),
           element_offset, out + kHeaderBytes};
  uint64_t nblocks = (numel - 1) / j.bs + 1;
  int nt = resolve_threads(threads, numel, nblocks);
  Result r = run_parallel(nblocks, nt, [&](uint64_t b0, uint64_t b1) {
    return encode_dispatch(j, b0, b1);
  });
  std::string where = " in " + elems(r.block, j.bs, numel);
  switch (r.status) {
    case kOk: return size_t(kHeaderBytes + payload);
    case kNonFinite: throw NonFiniteError(std::string("non-finite value (NaN or Inf)") +
                                          (b ? " in a - b" : "") + where);
    case kOverflow: throw CodecError(std::string("value out of range for ") +
                                     codec_name(opt.codec) + where);
    case kRangeOverflow: throw CodecError("block max - min overflows float32" + where);
    default: throw CodecError("encode failed" + where);
  }
}

Header parse_header(const uint8_t* buf, size_t len) {
  if (!buf || len < kHeaderBytes)
    throw DecodeError("packed buffer is " + std::to_string(len) +
                      " bytes, shorter than the 32-byte header");
  if (std::memcmp(buf, kMagic, 4) != 0) throw DecodeError("bad magic (not a packed tensor)");
  if (!valid_codec(buf[4])) throw DecodeError("unknown codec " + std::to_string(buf[4]));
  if (!valid_dtype(buf[5])) throw DecodeError("unknown source dtype " + std::to_string(buf[5]));
  if (buf[6] & ~1u) throw DecodeError("unknown flag bits " + std::to_string(buf[6]));
  if (buf[7] != 0 || get_u32(buf + 12) != 0) throw DecodeError("reserved header bytes are not 0");
  Header h;
  h.codec = Codec(buf[4]);
  h.src_dtype = DType(buf[5]);
  h.flags = buf[6];
  h.block_size = get_u32(buf + 8);
  h.numel = get_u64(buf + 16);
  h.payload_bytes = get_u64(buf + 24);
  if (codec_uses_blocks(h.codec)) {
    if (h.block_size < 1 || h.block_size > kMaxBlockSize)
      throw DecodeError("block_size " + std::to_string(h.block_size) + " out of range for " +
                        codec_name(h.codec));
  } else if (h.block_size != 0) {
    throw DecodeError(std::string("block_size must be 0 for ") + codec_name(h.codec));
  }
  uint64_t expect;
  if (!checked_payload(h.codec, h.src_dtype, h.numel, h.block_size, expect))
    throw DecodeError("numel " + std::to_string(h.numel) + " implies an impossible payload size");
  if (h.payload_bytes != expect)
    throw DecodeError("payload_bytes " + std::to_string(h.payload_bytes) + " but header implies " +
                      std::to_string(expect));
  if (len - kHeaderBytes != expect)
    throw DecodeError("buffer is " + std::to_string(len) + " bytes but header implies " +
                      std::to_string(expect + kHeaderBytes));
  return h;
}

void decode(const uint8_t* buf, size_t len, void* out, DType out_dtype, uint64_t out_numel,
            int threads) {
  decode_impl(buf, len, out, out_dtype, out_numel, false, threads);
}

void decode_accumulate(const uint8_t* buf, size_t len, float* acc, uint64_t acc_numel,
                       int threads) {
  decode_impl(buf, len, acc, DType::F32, acc_numel, true, threads);
}

bool simd_available() { return cpu_has_avx2(); }

void set_simd(bool enabled) { g_isa.store(enabled && cpu_has_avx2() ? 1 : 0); }

const char* simd_level() { return use_avx2() ? "avx2" : "baseline"; }

}  // namespace plcodec
