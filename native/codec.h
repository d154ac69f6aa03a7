// Quantized tensor packing: the contract between the codec kernels, their
// Python bindings and the stream layer (which encodes and decodes chunks on its
// own threads, with no Python involved).
//
// A packed buffer is self-describing: a 32-byte little-endian header followed
// by the codec's payload (layouts in docs/protocol.md).
//
//   off size field
//   0   4    magic "PLQ\x01"
//   4   1    codec         (Codec)
//   5   1    src dtype     (DType of the tensor that was encoded)
//   6   1    flags         (bit 0: stochastic rounding; other bits must be 0)
//   7   1    reserved, 0
//   8   4    block_size    (elements per scale block; 0 for codecs with no blocks)
//   12  4    reserved, 0
//   16  8    numel
//   24  8    payload_bytes (must equal the size the other fields imply)
//
// Invariants:
//  * encode() output depends only on (input values, options, element_offset):
//    never on thread count, chunking at block boundaries or the machine.
//  * Stochastic rounding draws element i's random number from a counter-based
//    generator keyed by (seed, element_offset + i), so encoding a tensor in
//    block-aligned chunks gives the same bytes as encoding it whole.
//  * Every decoder calls parse_header() first and never reads or writes outside
//    the buffers it was given; hostile input raises DecodeError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace plcodec {

// U8 is raw bytes (e.g. already-packed buffers forwarded as they are): only
// streams carry it; every codec function rejects it.
enum class DType : uint8_t { F32 = 1, BF16 = 2, F16 = 3, U8 = 4 };

enum class Codec : uint8_t {
  RAW = 0,          // the source bytes unchanged (dtype = src dtype)
  FP16 = 1,         // IEEE half, round to nearest even (or stochastic)
  BF16 = 2,         // bfloat16
  INT8_ABSMAX = 3,  // per block: f32 scale = absmax/127, int8 q = round(x/scale)
  INT8_MINMAX = 4,  // per block: f32 min, f32 scale = (max-min)/255, uint8 q
  INT4_ABSMAX = 5,  // per block: f32 scale = absmax/7, int4 q in [-7, 7], 2 per byte
  INT4_MINMAX = 6,  // per block: f32 min, f32 scale = (max-min)/15, uint4 q
  E3M0 = 7,         // Streaming DiLoCo 4-bit: 1 sign + 3 exponent bits, f32 scale per block
  FP8_E4M3 = 8,     // OCP fp8 e4m3 (finite, max 448), one f32 scale per block
};
constexpr int kCodecCount = 9;

constexpr size_t kHeaderBytes = 32;
constexpr uint32_t kMaxBlockSize = 1u << 20;

struct CodecError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Input to encode() held NaN or +-Inf; nothing was written that a caller may use.
struct NonFiniteError : CodecError {
  using CodecError::CodecError;
};
// A packed buffer failed validation (truncated, oversized, inconsistent, hostile).
struct DecodeError : CodecError {
  using CodecError::CodecError;
};

struct EncodeOptions {
  Codec codec = Codec::INT8_ABSMAX;
  uint32_t block_size = 64;  // ignored (stored as 0) by RAW, FP16, BF16
  bool stochastic = false;
  uint64_t seed = 0;
};

struct Header {
  Codec codec;
  DType src_dtype;
  uint8_t flags;
  uint32_t block_size;
  uint64_t numel;
  uint64_t payload_bytes;
};

const char* codec_name(Codec c);
size_t dtype_size(DType d);
bool codec_uses_blocks(Codec c);

// Payload bytes for numel elements; throws CodecError on invalid block_size.
uint64_t payload_bytes(Codec c, DType src, uint64_t numel, uint32_t block_size);
// Header + payload.
inline uint64_t packed_bytes(Codec c, DType src, uint64_t numel, uint32_t block_size) {
  return kHeaderBytes + payload_bytes(c, src, numel, block_size);
}

// Encodes a[0..numel) (or a - b elementwise when b != nullptr; a and b share
// dtype) into out, which must hold packed_bytes(...) bytes. Returns bytes
// written. threads <= 0 means "use the library default". Thread-safe; the GIL
// is the caller's business. Throws NonFiniteError if any input (or a - b) is
// not finite; out's content is then unspecified.
size_t encode(const void* a, const void* b, DType dtype, uint64_t numel, uint64_t element_offset,
              const EncodeOptions& opt, uint8_t* out, size_t out_cap, int threads);

// Validates the header against len (throws DecodeError) and returns it.
Header parse_header(const uint8_t* buf, size_t len);

// Decodes into out[0..numel) of out_dtype; numel must equal the header's.
void decode(const uint8_t* buf, size_t len, void* out, DType out_dtype, uint64_t out_numel,
            int threads);

// acc[i] += decoded[i] in fp32, without materialising the decoded tensor.
void decode_accumulate(const uint8_t* buf, size_t len, float* acc, uint64_t acc_numel,
                       int threads);

// Kernel selection. The AVX2 path and the baseline path produce identical
// bytes; forcing the baseline exists so tests can check exactly that. The
// PEERLEARN_CODEC_SCALAR=1 environment variable forces it at start-up.
bool simd_available();
void set_simd(bool enabled);  // enabled=false forces the baseline kernels
const char* simd_level();     // "avx2" or "baseline": what encode/decode use now

}  // namespace plcodec
