// Striped multi-connection transfer; see stream.h for the frame format and the
// ownership rules. Each connection gets one thread per op: encoding a chunk on
// one thread overlaps the sending of earlier chunks on the others, and a
// receiving thread decodes (or decode-accumulates) each chunk as it lands.
#include "stream.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace plstream {

namespace {

void put_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put_u64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint32_t get_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "frames are little-endian on the wire");

enum : uint8_t { KIND_DATA = 1, KIND_END = 2 };
enum : uint8_t { FLAG_PACKED = 1 };

struct Frame {
  uint8_t kind = 0, flags = 0, dtype = 0;
  uint64_t op_id = 0;
  uint32_t seq = 0, n_chunks = 0;
  uint64_t chunk_elems = 0;
  uint32_t payload_len = 0;
};

void encode_frame(const Frame& f, uint8_t* out) {
  std::memset(out, 0, kFrameHeaderBytes);
  put_u32(out, kFrameMagic);
  out[4] = f.kind;
  out[5] = f.flags;
  out[6] = f.dtype;
  put_u64(out + 8, f.op_id);
  put_u32(out + 16, f.seq);
  put_u32(out + 20, f.n_chunks);
  put_u64(out + 24, f.chunk_elems);
  put_u32(out + 32, f.payload_len);
}

// Structural checks that need no op context; the op checks the rest.
Frame decode_frame(const uint8_t* in) {
  if (get_u32(in) != kFrameMagic) throw StreamError(ErrorKind::PROTOCOL, "bad frame magic");
  Frame f;
  f.kind = in[4];
  f.flags = in[5];
  f.dtype = in[6];
  f.op_id = get_u64(in + 8);
  f.seq = get_u32(in + 16);
  f.n_chunks = get_u32(in + 20);
  f.chunk_elems = get_u64(in + 24);
  f.payload_len = get_u32(in + 32);
  if (in[7] != 0 || get_u32(in + 36) != 0)
    throw StreamError(ErrorKind::PROTOCOL, "reserved frame bytes are not zero");
  if (f.kind != KIND_DATA && f.kind != KIND_END)
    throw StreamError(ErrorKind::PROTOCOL, "unknown frame kind " + std::to_string(f.kind));
  if (f.flags & ~FLAG_PACKED) throw StreamError(ErrorKind::PROTOCOL, "unknown frame flags");
  if (f.payload_len > kMaxPayloadBytes)
    throw StreamError(ErrorKind::PROTOCOL, "frame payload " + std::to_string(f.payload_len) +
                                               " exceeds the limit");
  if (f.kind == KIND_END && (f.payload_len != 0 || f.flags != 0))
    throw StreamError(ErrorKind::PROTOCOL, "END frame with payload");
  if (f.kind == KIND_DATA && (f.chunk_elems == 0 || f.chunk_elems > kMaxChunkElems))
    throw StreamError(ErrorKind::PROTOCOL, "chunk_elems out of range");
  return f;
}

size_t elem_size(plcodec::DType d) {
  return d == plcodec::DType::U8 ? 1 : plcodec::dtype_size(d);
}

uint32_t chunk_count(uint64_t numel, uint64_t chunk_elems) {
  uint64_t n = (numel + chunk_elems - 1) / chunk_elems;
  if (n > UINT32_MAX) throw StreamError(ErrorKind::PROTOCOL, "too many chunks");
  return static_cast<uint32_t>(n);
}

}  // namespace

double monotonic_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ---------------------------------------------------------------- Op

Op::Op(std::vector<int> fds, double timeout_s) : fds_(std::move(fds)) {
  if (fds_.empty()) throw StreamError(ErrorKind::INPUT, "an op needs at least one connection");
  if (timeout_s > 0) deadline_ = monotonic_s() + timeout_s;
  conn_chunks_.reset(new std::atomic<uint32_t>[fds_.size()]);
  for (size_t i = 0; i < fds_.size(); ++i) conn_chunks_[i] = 0;
}

std::vector<uint32_t> Op::conn_chunks() const {
  std::vector<uint32_t> out(fds_.size());
  for (size_t i = 0; i < fds_.size(); ++i) out[i] = conn_chunks_[i].load();
  return out;
}

Op::~Op() {
  // Subclasses call cancel()+join in their destructors, while their members
  // are still alive; this is only the backstop.
  join_all();
}

void Op::start(void (Op::*body)(size_t)) {
  running_ = fds_.size();
  threads_.reserve(fds_.size());
  for (size_t i = 0; i < fds_.size(); ++i) threads_.emplace_back(&Op::run_conn, this, body, i);
}

void Op::run_conn(void (Op::*body)(size_t), size_t conn) {
  try {
    (this->*body)(conn);
  } catch (const StreamError& e) {
    fail(e.kind, e.what());
  } catch (const plcodec::CodecError& e) {
    fail(ErrorKind::CODEC, e.what());
  } catch (const std::exception& e) {
    fail(ErrorKind::IO, e.what());
  }
  if (--running_ == 0) {
    on_all_done();
    finished_ = true;
  }
}

void Op::fail(ErrorKind k, const std::string& msg) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (err_kind_ != ErrorKind::NONE) return;
    err_kind_ = k;
    err_msg_ = msg;
  }
  stop_ = true;
  // The peer must learn of the abort now, not at its own timeout, and our
  // sibling threads blocked in poll() must wake: shutting the sockets down
  // does both. It also guarantees that nothing still queued on these
  // connections can be read as part of a later op.
  for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
}

void Op::cancel() { fail(ErrorKind::CANCELLED, "transfer cancelled"); }

void Op::join_all() {
  if (joined_) return;
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  joined_ = true;
}

bool Op::wait(double timeout_s) {
  if (timeout_s > 0) {
    double until = monotonic_s() + timeout_s;
    while (!finished_.load()) {
      if (monotonic_s() >= until) return false;
      struct timespec ts = {0, 2000000};
      nanosleep(&ts, nullptr);
    }
  }
  join_all();
  std::lock_guard<std::mutex> g(mu_);
  if (err_kind_ != ErrorKind::NONE) throw StreamError(err_kind_, err_msg_);
  return true;
}

void Op::wait_fd(int fd, bool for_write) {
  for (;;) {
    if (should_stop()) throw StreamError(ErrorKind::CANCELLED, "transfer aborted");
    int slice_ms = 100;
    if (deadline_ > 0) {
      double left = deadline_ - monotonic_s();
      if (left <= 0) throw StreamError(ErrorKind::TIMEOUT, "transfer timed out");
      if (left * 1000 < slice_ms) slice_ms = static_cast<int>(left * 1000) + 1;
    }
    pollfd p{fd, static_cast<short>(for_write ? POLLOUT : POLLIN), 0};
    int r = ::poll(&p, 1, slice_ms);
    if (r < 0 && errno != EINTR) throw StreamError(ErrorKind::IO, std::strerror(errno));
    if (r > 0) return;  // ready, or POLLERR/POLLHUP: the next syscall reports it
  }
}

void Op::send_all(int fd, const iovec* iov_in, int iovcnt) {
  iovec iov[4];
  std::memcpy(iov, iov_in, sizeof(iovec) * iovcnt);
  int idx = 0;
  while (idx < iovcnt) {
    wait_fd(fd, true);
    msghdr mh{};
    mh.msg_iov = iov + idx;
    mh.msg_iovlen = iovcnt - idx;
    ssize_t n = ::sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
      throw StreamError(ErrorKind::IO, std::string("send failed: ") + std::strerror(errno));
    }
    wire_bytes_ += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (idx < iovcnt && left >= iov[idx].iov_len) left -= iov[idx++].iov_len;
    if (idx < iovcnt) {
      iov[idx].iov_base = static_cast<uint8_t*>(iov[idx].iov_base) + left;
      iov[idx].iov_len -= left;
    }
  }
}

void Op::recv_all(int fd, uint8_t* dst, size_t len) {
  while (len > 0) {
    wait_fd(fd, false);
    ssize_t n = ::recv(fd, dst, len, MSG_DONTWAIT);
    if (n == 0) throw StreamError(ErrorKind::IO, "connection closed by peer");
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
      throw StreamError(ErrorKind::IO, std::string("recv failed: ") + std::strerror(errno));
    }
    wire_bytes_ += static_cast<uint64_t>(n);
    dst += n;
    len -= static_cast<size_t>(n);
  }
}

// ---------------------------------------------------------------- SendOp

SendOp::SendOp(std::vector<int> fds, Buffer src, SendOptions opt)
    : Op(std::move(fds), opt.timeout_s), src_(src), opt_(opt) {
  // Checks of the caller's own arguments: INPUT, never PROTOCOL (that blames the peer).
  if (opt_.chunk_elems == 0 || opt_.chunk_elems > kMaxChunkElems)
    throw StreamError(ErrorKind::INPUT, "chunk_elems out of range");
  if (opt_.packed && src_.dtype == plcodec::DType::U8)
    throw StreamError(ErrorKind::INPUT, "bytes are sent raw, not through a codec");
  if (opt_.packed && plcodec::codec_uses_blocks(opt_.codec.codec) &&
      opt_.chunk_elems % opt_.codec.block_size != 0)
    throw StreamError(ErrorKind::INPUT, "chunk_elems must be a multiple of the codec block");
  uint64_t max_payload = opt_.packed ? plcodec::packed_bytes(opt_.codec.codec, src_.dtype,
                                                             opt_.chunk_elems,
                                                             opt_.codec.block_size)
                                     : opt_.chunk_elems * elem_size(src_.dtype);
  if (max_payload > kMaxPayloadBytes)
    throw StreamError(ErrorKind::INPUT, "a chunk would exceed the frame payload limit");
  n_chunks_ = chunk_count(src_.numel, opt_.chunk_elems);
  start(static_cast<void (Op::*)(size_t)>(&SendOp::conn_body));
}

SendOp::~SendOp() {
  if (!done()) cancel();
  try {
    wait(0);
  } catch (const StreamError&) {
  }
}

void SendOp::conn_body(size_t conn) {
  const int fd = fds_[conn];
  const size_t esize = elem_size(src_.dtype);
  std::vector<uint8_t> packed;
  if (opt_.packed)
    packed.resize(plcodec::packed_bytes(opt_.codec.codec, src_.dtype, opt_.chunk_elems,
                                        opt_.codec.block_size));
  uint8_t hdr[kFrameHeaderBytes];
  uint32_t sent = 0;
  for (;;) {
    if (should_stop()) throw StreamError(ErrorKind::CANCELLED, "transfer aborted");
    uint32_t seq = next_chunk_.fetch_add(1);
    if (seq >= n_chunks_) break;
    uint64_t first = static_cast<uint64_t>(seq) * opt_.chunk_elems;
    uint64_t elems = std::min<uint64_t>(opt_.chunk_elems, src_.numel - first);
    const uint8_t* src = src_.data + first * esize;
    Frame f;
    f.kind = KIND_DATA;
    f.op_id = opt_.op_id;
    f.seq = seq;
    f.n_chunks = n_chunks_;
    f.chunk_elems = opt_.chunk_elems;
    iovec iov[2];
    if (opt_.packed) {
      size_t n;
      try {
        n = plcodec::encode(src, nullptr, src_.dtype, elems, first, opt_.codec, packed.data(),
                            packed.size(), 1);
      } catch (const plcodec::CodecError& e) {
        throw StreamError(ErrorKind::INPUT, std::string("cannot encode the tensor: ") + e.what());
      }
      f.flags = FLAG_PACKED;
      f.payload_len = static_cast<uint32_t>(n);
      iov[1] = {packed.data(), n};
    } else {
      f.dtype = static_cast<uint8_t>(src_.dtype);
      f.payload_len = static_cast<uint32_t>(elems * esize);
      iov[1] = {const_cast<uint8_t*>(src), elems * esize};  // zero copy
    }
    encode_frame(f, hdr);
    iov[0] = {hdr, kFrameHeaderBytes};
    send_all(fd, iov, 2);
    ++sent;
    ++conn_chunks_[conn];
  }
  Frame end;
  end.kind = KIND_END;
  end.op_id = opt_.op_id;
  end.seq = sent;
  end.n_chunks = n_chunks_;
  encode_frame(end, hdr);
  iovec iov{hdr, kFrameHeaderBytes};
  send_all(fd, &iov, 1);
}

// ---------------------------------------------------------------- RecvOp

RecvOp::RecvOp(std::vector<int> fds, Buffer dst, RecvOptions opt)
    : Op(std::move(fds), opt.timeout_s), dst_(dst), opt_(opt) {
  if (opt_.mode == RecvMode::ACCUMULATE && dst_.dtype != plcodec::DType::F32)
    throw StreamError(ErrorKind::INPUT, "accumulating needs a float32 destination");
  start(static_cast<void (Op::*)(size_t)>(&RecvOp::conn_body));
}

RecvOp::~RecvOp() {
  if (!done()) cancel();
  try {
    wait(0);
  } catch (const StreamError&) {
  }
}

void RecvOp::on_all_done() {
  std::lock_guard<std::mutex> g(seen_mu_);
  if (dst_.numel == 0 || (n_chunks_ > 0 && received_ == n_chunks_)) return;
  // Every connection ended cleanly yet chunks are missing: a sender bug or a
  // hostile peer. Never hand back a partially written destination as success.
  fail(ErrorKind::PROTOCOL, "op ended with " + std::to_string(received_) + " of " +
                                std::to_string(n_chunks_) + " chunks");
}

uint64_t RecvOp::claim_chunk(uint64_t chunk_elems, uint32_t n_chunks, uint32_t seq) {
  std::lock_guard<std::mutex> g(seen_mu_);
  if (chunk_elems_ == 0) {
    uint32_t expect = chunk_count(dst_.numel, chunk_elems);
    if (n_chunks != expect)
      throw StreamError(ErrorKind::PROTOCOL,
                        "sender has " + std::to_string(n_chunks) + " chunks, destination needs " +
                            std::to_string(expect) + " (tensor sizes differ)");
    chunk_elems_ = chunk_elems;
    n_chunks_ = n_chunks;
    seen_.assign(n_chunks, 0);
  }
  if (chunk_elems != chunk_elems_ || n_chunks != n_chunks_)
    throw StreamError(ErrorKind::PROTOCOL, "chunk geometry changed within an op");
  if (seq >= n_chunks_) throw StreamError(ErrorKind::PROTOCOL, "chunk index out of range");
  if (seen_[seq]) throw StreamError(ErrorKind::PROTOCOL, "duplicate chunk");
  seen_[seq] = 1;
  ++received_;
  uint64_t first = static_cast<uint64_t>(seq) * chunk_elems_;
  return std::min<uint64_t>(chunk_elems_, dst_.numel - first);
}

// acc[0..elems) += incoming f32 values, through a bounded scratch: memory does
// not depend on the chunk size the sender picked.
void RecvOp::recv_accumulate_raw(int fd, float* acc, uint64_t elems,
                                 std::vector<uint8_t>& scratch) {
  constexpr uint64_t kSliceElems = 1 << 14;
  scratch.resize(kSliceElems * sizeof(float));
  const float* in = reinterpret_cast<const float*>(scratch.data());
  while (elems > 0) {
    uint64_t n = std::min(elems, kSliceElems);
    recv_all(fd, scratch.data(), n * sizeof(float));
    for (uint64_t i = 0; i < n; ++i) acc[i] += in[i];
    acc += n;
    elems -= n;
  }
}

// Receives a packed chunk of len bytes whose first kHeaderBytes (already read)
// are in head. The buffer grows with the bytes that actually arrived (at most
// doubling), so a sender that announces a large chunk and stalls costs the
// receiver what it sent, not what it announced.
void RecvOp::recv_growing(int fd, const uint8_t* head, uint32_t len,
                          std::vector<uint8_t>& buf) {
  constexpr size_t kFirstStep = 1 << 16;
  size_t have = plcodec::kHeaderBytes;
  if (buf.size() < have) buf.resize(have);
  std::memcpy(buf.data(), head, have);
  while (have < len) {
    size_t want = std::min<size_t>(len, std::max(have * 2, kFirstStep));
    if (buf.size() < want) buf.resize(want);
    recv_all(fd, buf.data() + have, want - have);
    have = want;
  }
}

void RecvOp::conn_body(size_t conn) {
  const int fd = fds_[conn];
  const size_t esize = elem_size(dst_.dtype);
  std::vector<uint8_t> scratch;
  uint8_t hdr[kFrameHeaderBytes];
  uint32_t got = 0;
  for (;;) {
    recv_all(fd, hdr, kFrameHeaderBytes);
    Frame f = decode_frame(hdr);
    if (f.op_id != opt_.op_id)
      throw StreamError(ErrorKind::PROTOCOL, "frame of op " + std::to_string(f.op_id) +
                                                 " while receiving op " +
                                                 std::to_string(opt_.op_id));
    if (f.kind == KIND_END) {
      if (f.seq != got)
        throw StreamError(ErrorKind::PROTOCOL, "END frame counts a different number of chunks");
      break;
    }
    // Everything the header claims is checked against what this receive
    // expects before a byte of payload is read or a byte of memory is taken:
    // a sender's payload_len alone never sizes an allocation.
    uint64_t elems = claim_chunk(f.chunk_elems, f.n_chunks, f.seq);
    uint64_t first = static_cast<uint64_t>(f.seq) * f.chunk_elems;
    uint8_t* dst = dst_.data + first * esize;
    if (!(f.flags & FLAG_PACKED)) {
      if (f.dtype != static_cast<uint8_t>(dst_.dtype))
        throw StreamError(ErrorKind::PROTOCOL, "raw chunk dtype differs from the destination's");
      if (f.payload_len != elems * esize)
        throw StreamError(ErrorKind::PROTOCOL, "raw chunk length does not match its element count");
      if (opt_.mode == RecvMode::COPY)
        recv_all(fd, dst, f.payload_len);  // zero copy into the destination
      else
        recv_accumulate_raw(fd, reinterpret_cast<float*>(dst), elems, scratch);
    } else {
      if (f.dtype != 0) throw StreamError(ErrorKind::PROTOCOL, "packed chunk names a dtype");
      if (f.payload_len < plcodec::kHeaderBytes)
        throw StreamError(ErrorKind::PROTOCOL, "packed chunk shorter than its codec header");
      uint8_t qhdr[plcodec::kHeaderBytes];
      recv_all(fd, qhdr, sizeof qhdr);
      // parse_header reads only the 32 header bytes; given payload_len it
      // checks that the codec, block size and numel imply exactly that length.
      plcodec::Header h = plcodec::parse_header(qhdr, f.payload_len);
      if (h.numel != elems)
        throw StreamError(ErrorKind::PROTOCOL, "packed chunk element count does not match");
      wire_codec_.store(static_cast<int>(h.codec), std::memory_order_relaxed);
      recv_growing(fd, qhdr, f.payload_len, scratch);
      if (opt_.mode == RecvMode::COPY)
        plcodec::decode(scratch.data(), f.payload_len, dst, dst_.dtype, elems, 1);
      else
        plcodec::decode_accumulate(scratch.data(), f.payload_len, reinterpret_cast<float*>(dst),
                                   elems, 1);
    }
    ++got;
    ++conn_chunks_[conn];
  }
}

}  // namespace plstream
