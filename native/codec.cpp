// TEMPORARY (not committed): raw-only codec so the stream builds until the kernels land.
#include "codec.h"
#include <cstring>
namespace plcodec {
size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }
bool codec_uses_blocks(Codec c) { return !(c == Codec::RAW || c == Codec::FP16 || c == Codec::BF16); }
uint64_t payload_bytes(Codec c, DType src, uint64_t numel, uint32_t) {
  if (c != Codec::RAW) throw CodecError("only raw");
  return numel * dtype_size(src);
}
size_t encode(const void* a, const void*, DType dtype, uint64_t numel, uint64_t, const EncodeOptions& opt, uint8_t* out, size_t, int) {
  std::memset(out, 0, 32); std::memcpy(out, "PLQ\x01", 4); out[4] = (uint8_t)opt.codec; out[5] = (uint8_t)dtype;
  std::memcpy(out + 16, &numel, 8); uint64_t pb = numel * dtype_size(dtype); std::memcpy(out + 24, &pb, 8);
  std::memcpy(out + 32, a, pb); return 32 + pb;
}
Header parse_header(const uint8_t* b, size_t len) {
  if (len < 32 || std::memcmp(b, "PLQ\x01", 4)) throw DecodeError("bad");
  Header h{}; h.codec = (Codec)b[4]; h.src_dtype = (DType)b[5]; std::memcpy(&h.numel, b + 16, 8); std::memcpy(&h.payload_bytes, b + 24, 8);
  if (h.payload_bytes + 32 != len) throw DecodeError("len"); return h;
}
void decode(const uint8_t* b, size_t len, void* out, DType, uint64_t, int) { std::memcpy(out, b + 32, len - 32); }
void decode_accumulate(const uint8_t* b, size_t, float* acc, uint64_t n, int) { const float* x = (const float*)(b + 32); for (uint64_t i = 0; i < n; ++i) acc[i] += x[i]; }
}
