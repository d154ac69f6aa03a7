// Thin nanobind layer over codec.h and hash.h. Tensors arrive through DLPack /
// the buffer protocol without copies; output arguments are marked noconvert so
// nanobind can never hand the kernels a temporary copy of the caller's
// buffer. Every bulk call runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <string>

#include "codec.h"
#include "hash.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Src = nb::ndarray<nb::ro, nb::device::cpu, nb::c_contig>;
using Dst = nb::ndarray<nb::device::cpu, nb::c_contig>;
using Packed = nb::ndarray<nb::ro, uint8_t, nb::device::cpu, nb::c_contig>;
using PackedOut = nb::ndarray<uint8_t, nb::device::cpu, nb::c_contig>;

plcodec::DType dtype_of(const nb::dlpack::dtype& d, const char* what) {
  using nb::dlpack::dtype_code;
  if (d.lanes == 1 && d.code == uint8_t(dtype_code::Float) && d.bits == 32) return plcodec::DType::F32;
  if (d.lanes == 1 && d.code == uint8_t(dtype_code::Bfloat) && d.bits == 16) return plcodec::DType::BF16;
  if (d.lanes == 1 && d.code == uint8_t(dtype_code::Float) && d.bits == 16) return plcodec::DType::F16;
  throw nb::type_error((std::string(what) + " must be float32, bfloat16 or float16").c_str());
}

plcodec::Codec codec_of(int c) {
  if (c < 0 || c >= plcodec::kCodecCount) throw plcodec::CodecError("unknown codec " + std::to_string(c));
  return plcodec::Codec(c);
}

plcodec::DType dtype_from_int(int d) {
  if (d < 1 || d > 3) throw plcodec::CodecError("unknown dtype " + std::to_string(d));
  return plcodec::DType(d);
}

size_t nbytes_of(const Src& a) { return a.nbytes(); }

bool overlaps(const void* p, size_t n, const void* q, size_t m) {
  auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  return n && m && a < b + m && b < a + n;
}

nb::dict header_dict(const plcodec::Header& h) {
  nb::dict d;
  d["codec"] = int(h.codec);
  d["codec_name"] = plcodec::codec_name(h.codec);
  d["dtype"] = int(h.src_dtype);
  d["flags"] = int(h.flags);
  d["stochastic"] = bool(h.flags & 1);
  d["block_size"] = h.block_size;
  d["numel"] = h.numel;
  d["payload_bytes"] = h.payload_bytes;
  return d;
}

}  // namespace

void bind_codec(nb::module_& m) {
  // Registered base first: nanobind tries the most recently registered
  // translator first, so the subclasses must come after their base.
  // Roots: peerlearn.errors.PeerlearnError (one exception tree for the
  // whole library) and the builtin the error behaves like.
  static nb::object codec_bases = nb::steal(PyTuple_Pack(
      2, nb::module_::import_("peerlearn.errors").attr("PeerlearnError").ptr(), PyExc_ValueError));
  static nb::exception<plcodec::CodecError> codec_error(m, "CodecError", codec_bases);
  static nb::exception<plcodec::NonFiniteError> nonfinite_error(m, "NonFiniteError", codec_error);
  static nb::exception<plcodec::DecodeError> decode_error(m, "DecodeError", codec_error);

  m.attr("HEADER_BYTES") = plcodec::kHeaderBytes;
  m.attr("MAX_BLOCK_SIZE") = plcodec::kMaxBlockSize;

  m.def("packed_size",
        [](int codec, int dtype, uint64_t numel, uint32_t block_size) {
          plcodec::Codec c = codec_of(codec);
          return plcodec::packed_bytes(c, dtype_from_int(dtype), numel,
                                       plcodec::codec_uses_blocks(c) ? block_size : 0);
        },
        "codec"_a, "dtype"_a, "numel"_a, "block_size"_a = 64,
        "Bytes (header + payload) that encode_into writes. dtype is the DType value "
        "(1=float32, 2=bfloat16, 3=float16).");

  m.def("encode_into",
        [](Src src, PackedOut out, int codec, uint32_t block_size, bool stochastic, uint64_t seed,
           uint64_t element_offset, int threads, std::optional<Src> diff_b) {
          plcodec::DType dt = dtype_of(src.dtype(), "src");
          const void* b = nullptr;
          if (diff_b) {
            if (dtype_of(diff_b->dtype(), "diff_b") != dt || diff_b->size() != src.size())
              throw nb::value_error("diff_b must have the same dtype and numel as src");
            b = diff_b->data();
          }
          if (overlaps(out.data(), out.size(), src.data(), nbytes_of(src)) ||
              (diff_b && overlaps(out.data(), out.size(), b, nbytes_of(*diff_b))))
            throw nb::value_error("out overlaps an input");
          plcodec::EncodeOptions opt;
          opt.codec = codec_of(codec);
          opt.block_size = block_size;
          opt.stochastic = stochastic;
          opt.seed = seed;
          nb::gil_scoped_release nogil;
          return plcodec::encode(src.data(), b, dt, src.size(), element_offset, opt, out.data(),
                                 out.size(), threads);
        },
        "src"_a, "out"_a.noconvert(), "codec"_a, "block_size"_a = 64, "stochastic"_a = false,
        "seed"_a = 0, "element_offset"_a = 0, "threads"_a = 0, "diff_b"_a = nb::none(),
        "Encode src (or src - diff_b) into the uint8 buffer out; returns bytes written.");

  m.def("decode_into",
        [](Packed packed, Dst out, int threads) {
          plcodec::DType dt = dtype_of(out.dtype(), "out");
          if (overlaps(out.data(), out.nbytes(), packed.data(), packed.size()))
            throw nb::value_error("out overlaps the packed buffer");
          nb::gil_scoped_release nogil;
          plcodec::decode(packed.data(), packed.size(), out.data(), dt, out.size(), threads);
        },
        "packed"_a, "out"_a.noconvert(), "threads"_a = 0,
        "Decode packed into out (float32/bfloat16/float16, numel must match) in place.");

  m.def("decode_accumulate",
        [](Packed packed, Dst acc, int threads) {
          if (dtype_of(acc.dtype(), "acc") != plcodec::DType::F32)
            throw nb::type_error("acc must be float32");
          if (overlaps(acc.data(), acc.nbytes(), packed.data(), packed.size()))
            throw nb::value_error("acc overlaps the packed buffer");
          nb::gil_scoped_release nogil;
          plcodec::decode_accumulate(packed.data(), packed.size(),
                                     static_cast<float*>(acc.data()), acc.size(), threads);
        },
        "packed"_a, "acc"_a.noconvert(), "threads"_a = 0,
        "acc[i] += decoded[i] in float32, in place.");

  m.def("parse_header",
        [](Packed packed) { return header_dict(plcodec::parse_header(packed.data(), packed.size())); },
        "packed"_a, "Validate a packed buffer's header against its length; returns its fields.");

  m.def("xxh64",
        [](Src data, uint64_t seed) {
          const void* p = data.data();
          size_t n = data.nbytes();
          nb::gil_scoped_release nogil;
          return plhash::xxh64(p, n, seed);
        },
        "data"_a, "seed"_a = 0, "XXH64 of the raw bytes of a contiguous buffer or tensor.");

  m.def("simd_available", &plcodec::simd_available);
  m.def("set_simd", &plcodec::set_simd, "enabled"_a,
        "False forces the baseline kernels (they produce the same bytes; for tests).");
  m.def("simd_level", &plcodec::simd_level);
}
