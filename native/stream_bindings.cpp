// Python face of the striped streams: validate and convert at the boundary,
// release the GIL while waiting. The binding object keeps the tensor it
// borrows alive and joins the op's threads before letting go of it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "stream.h"

namespace nb = nanobind;
using plstream::ErrorKind;

namespace {

using CpuArray = nb::ndarray<nb::device::cpu, nb::c_contig>;

PyObject* g_stream_error = nullptr;
PyObject* g_timeout_error = nullptr;
PyObject* g_cancelled_error = nullptr;
PyObject* g_protocol_error = nullptr;
PyObject* g_input_error = nullptr;

plcodec::DType dtype_of(const CpuArray& a) {
  nb::dlpack::dtype d = a.dtype();
  if (d.lanes == 1) {
    if (d.code == (uint8_t)nb::dlpack::dtype_code::Float && d.bits == 32) return plcodec::DType::F32;
    if (d.code == (uint8_t)nb::dlpack::dtype_code::Float && d.bits == 16) return plcodec::DType::F16;
    if (d.code == (uint8_t)nb::dlpack::dtype_code::Bfloat && d.bits == 16)
      return plcodec::DType::BF16;
    if (d.code == (uint8_t)nb::dlpack::dtype_code::UInt && d.bits == 8) return plcodec::DType::U8;
  }
  throw nb::type_error("streams carry float32, bfloat16, float16 or uint8 tensors");
}

plstream::Buffer buffer_of(const CpuArray& a) {
  plstream::Buffer b;
  b.data = static_cast<uint8_t*>(a.data());
  b.dtype = dtype_of(a);
  b.numel = a.size();
  return b;
}

// Member order matters: op_ is destroyed (cancelled and joined) before keep_
// releases the tensor its threads were touching.
template <class OpT>
struct PyOp {
  nb::object keep_;
  std::unique_ptr<OpT> op_;

  bool wait(double timeout_s) {
    nb::gil_scoped_release unlocked;
    return op_->wait(timeout_s);
  }
  ~PyOp() {
    nb::gil_scoped_release unlocked;
    op_.reset();
  }
};

using PySend = PyOp<plstream::SendOp>;
using PyRecv = PyOp<plstream::RecvOp>;

template <class T>
void bind_op_methods(nb::class_<T>& c) {
  c.def("wait", &T::wait, nb::arg("timeout_s") = 0.0,
        "Block until the op ends (GIL released); raise its first error. With timeout_s > 0, "
        "return False if it is still running then.")
      .def("cancel", [](T& s) { s.op_->cancel(); })
      .def_prop_ro("done", [](T& s) { return s.op_->done(); })
      .def_prop_ro("bytes_on_wire", [](T& s) { return s.op_->bytes_on_wire(); })
      .def_prop_ro("wire_codec", [](T& s) { return s.op_->wire_codec(); },
                   "Codec id of the packed chunks received (-1: raw, or none yet).")
      .def_prop_ro("conn_chunks", [](T& s) { return s.op_->conn_chunks(); },
                   "DATA frames each connection carried so far.");
}

}  // namespace

void bind_stream(nb::module_& m) {
  // Roots: peerlearn.errors.PeerlearnError (one exception tree for the
  // whole library) and ConnectionError (what callers of sockets catch).
  nb::object root = nb::module_::import_("peerlearn.errors").attr("PeerlearnError");
  PyObject* stream_bases = PyTuple_Pack(2, root.ptr(), PyExc_ConnectionError);
  g_stream_error = PyErr_NewExceptionWithDoc(
      "peerlearn._native.StreamError", "A striped transfer failed; the link is unusable.",
      stream_bases, nullptr);
  Py_DECREF(stream_bases);
  PyObject* timeout_bases = PyTuple_Pack(2, g_stream_error, PyExc_TimeoutError);
  g_timeout_error = PyErr_NewException("peerlearn._native.StreamTimeout", timeout_bases, nullptr);
  Py_DECREF(timeout_bases);
  g_cancelled_error = PyErr_NewException("peerlearn._native.StreamCancelled", g_stream_error, nullptr);
  g_protocol_error =
      PyErr_NewException("peerlearn._native.StreamProtocolError", g_stream_error, nullptr);
  PyObject* input_bases = PyTuple_Pack(2, g_stream_error, PyExc_ValueError);
  g_input_error = PyErr_NewException("peerlearn._native.StreamInputError", input_bases, nullptr);
  Py_DECREF(input_bases);
  m.attr("StreamError") = nb::borrow(g_stream_error);
  m.attr("StreamInputError") = nb::borrow(g_input_error);
  m.attr("StreamTimeout") = nb::borrow(g_timeout_error);
  m.attr("StreamCancelled") = nb::borrow(g_cancelled_error);
  m.attr("StreamProtocolError") = nb::borrow(g_protocol_error);

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const plstream::StreamError& e) {
      PyObject* cls = g_stream_error;
      switch (e.kind) {
        case ErrorKind::TIMEOUT: cls = g_timeout_error; break;
        case ErrorKind::CANCELLED: cls = g_cancelled_error; break;
        case ErrorKind::PROTOCOL:
        case ErrorKind::CODEC: cls = g_protocol_error; break;
        case ErrorKind::INPUT: cls = g_input_error; break;
        default: break;
      }
      PyErr_SetString(cls, e.what());
    }
  });

  m.attr("FRAME_HEADER_BYTES") = plstream::kFrameHeaderBytes;
  m.attr("MAX_FRAME_PAYLOAD_BYTES") = plstream::kMaxPayloadBytes;
  m.attr("MAX_CHUNK_ELEMS") = plstream::kMaxChunkElems;

  auto send = nb::class_<PySend>(m, "SendOp", "A striped send in flight (see native/stream.h).");
  bind_op_methods(send);
  m.def(
      "start_send",
      [](std::vector<int> fds, CpuArray src, uint64_t op_id, uint64_t chunk_elems, int codec,
         uint32_t block_size, bool stochastic, uint64_t seed, double timeout_s) {
        plstream::SendOptions opt;
        opt.op_id = op_id;
        opt.chunk_elems = chunk_elems;
        opt.timeout_s = timeout_s;
        opt.packed = codec >= 0;
        if (opt.packed) {
          if (codec >= plcodec::kCodecCount) throw nb::value_error("unknown codec");
          opt.codec.codec = static_cast<plcodec::Codec>(codec);
          opt.codec.block_size = block_size;
          opt.codec.stochastic = stochastic;
          opt.codec.seed = seed;
        }
        auto* out = new PySend();
        out->keep_ = nb::cast(src);
        try {
          plstream::Buffer b = buffer_of(src);
          nb::gil_scoped_release unlocked;
          out->op_ = std::make_unique<plstream::SendOp>(std::move(fds), b, opt);
        } catch (...) {
          delete out;
          throw;
        }
        return out;
      },
      nb::arg("fds"), nb::arg("src").noconvert(), nb::arg("op_id"), nb::arg("chunk_elems"),
      nb::arg("codec") = -1, nb::arg("block_size") = 0, nb::arg("stochastic") = false,
      nb::arg("seed") = 0, nb::arg("timeout_s") = 0.0, nb::rv_policy::take_ownership,
      "Start sending src over the connected sockets fds (borrowed, never closed). codec < 0 "
      "sends raw elements with zero copies.");

  auto recv = nb::class_<PyRecv>(m, "RecvOp", "A striped receive in flight (see native/stream.h).");
  bind_op_methods(recv);
  m.def(
      "start_recv",
      [](std::vector<int> fds, CpuArray dst, uint64_t op_id, bool accumulate, double timeout_s) {
        plstream::RecvOptions opt;
        opt.op_id = op_id;
        opt.mode = accumulate ? plstream::RecvMode::ACCUMULATE : plstream::RecvMode::COPY;
        opt.timeout_s = timeout_s;
        auto* out = new PyRecv();
        out->keep_ = nb::cast(dst);
        try {
          plstream::Buffer b = buffer_of(dst);
          nb::gil_scoped_release unlocked;
          out->op_ = std::make_unique<plstream::RecvOp>(std::move(fds), b, opt);
        } catch (...) {
          delete out;
          throw;
        }
        return out;
      },
      nb::arg("fds"), nb::arg("dst").noconvert(), nb::arg("op_id"), nb::arg("accumulate") = false,
      nb::arg("timeout_s") = 0.0, nb::rv_policy::take_ownership,
      "Start receiving into dst (written in place; with accumulate, dst += incoming in fp32). "
      "On failure dst holds an unspecified mix of old and new values.");
}
