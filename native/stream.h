// Striped transfer of one tensor over N already-connected, already-authenticated
// TCP sockets. The Python transport layer opens and authenticates the sockets
// and owns them; an op borrows their file descriptors for its lifetime and
// never closes them (on abort it shuts them down so the peer fails fast too).
//
// Frame (40 bytes, little-endian), then payload_len bytes:
//   0  u32 magic "PLF1"
//   4  u8  kind        1 = DATA, 2 = END (no more chunks on this connection)
//   5  u8  flags       bit 0: payload is a packed codec buffer (codec.h)
//   6  u8  dtype       DType of raw payload elements (0 when packed)
//   7  u8  reserved, 0
//   8  u64 op_id
//   16 u32 seq         DATA: chunk index; END: number of DATA frames this connection sent
//   20 u32 n_chunks    total chunks of the op
//   24 u64 chunk_elems elements per chunk (the last chunk may be shorter)
//   32 u32 payload_len
//   36 u32 reserved, 0
//
// Chunks are handed to connections dynamically (whichever is free takes the
// next), so a slow connection carries less. Every frame names its op_id and
// the receiver rejects any other, and an aborted op leaves its sockets shut
// down: no frame of an aborted op can become part of a later one.
#pragma once

#include <atomic>
#include <memory>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <sys/uio.h>
#include <string>
#include <thread>
#include <vector>

#include "codec.h"

namespace plstream {

constexpr uint32_t kFrameMagic = 0x31464c50;  // "PLF1"
constexpr size_t kFrameHeaderBytes = 40;
constexpr uint64_t kMaxChunkElems = 1ull << 24;
constexpr uint32_t kMaxPayloadBytes = 1u << 27;  // 128 MiB

// CODEC: a received chunk failed to decode (the peer's fault, like PROTOCOL);
// INPUT: our own side is at fault: a tensor that cannot be encoded (NaN, Inf)
// or arguments out of range. Raised as StreamInputError, a ValueError.
enum class ErrorKind { NONE, IO, PROTOCOL, TIMEOUT, CANCELLED, CODEC, INPUT };

struct StreamError : std::runtime_error {
  ErrorKind kind;
  StreamError(ErrorKind k, const std::string& m) : std::runtime_error(m), kind(k) {}
};

struct Buffer {
  uint8_t* data = nullptr;  // borrowed; the binding layer keeps its owner alive
  plcodec::DType dtype = plcodec::DType::F32;
  uint64_t numel = 0;
};

struct SendOptions {
  uint64_t op_id = 0;
  uint64_t chunk_elems = 1 << 18;
  bool packed = false;  // false: raw elements, zero-copy from the source buffer
  plcodec::EncodeOptions codec;
  double timeout_s = 0;  // 0: none
};

enum class RecvMode { COPY, ACCUMULATE };

struct RecvOptions {
  uint64_t op_id = 0;
  RecvMode mode = RecvMode::COPY;  // ACCUMULATE needs an F32 destination
  double timeout_s = 0;
};

// One transfer in flight. Threads start in the constructor; wait() joins them
// and rethrows the first error. The destructor cancels and joins, so an op
// never outlives the buffers it borrows as long as their owner outlives it.
class Op {
 public:
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;
  virtual ~Op();

  // Blocks until done; returns false if timeout_s (>0) elapsed first.
  bool wait(double timeout_s);
  void cancel();
  bool done() const { return finished_.load(); }
  uint64_t bytes_on_wire() const { return wire_bytes_.load(); }
  // Codec id of the packed chunks received (-1: raw, or none yet); a receiver
  // learns it from the frames, so its byte counts can name the codec too.
  int wire_codec() const { return wire_codec_.load(std::memory_order_relaxed); }
  // DATA frames each connection carried so far (shows the striping).
  std::vector<uint32_t> conn_chunks() const;

 protected:
  Op(std::vector<int> fds, double timeout_s);
  void start(void (Op::*body)(size_t conn));
  void fail(ErrorKind k, const std::string& msg);
  // Runs on the last connection thread to finish, before done() turns true.
  virtual void on_all_done() {}
  bool should_stop() const { return stop_.load(std::memory_order_relaxed); }
  // Waits until fd is readable/writable; throws on cancel, deadline or error.
  void wait_fd(int fd, bool for_write);
  void send_all(int fd, const struct iovec* iov, int iovcnt);
  void recv_all(int fd, uint8_t* dst, size_t len);

  std::vector<int> fds_;
  double deadline_ = 0;  // monotonic seconds, 0: none
  std::atomic<uint64_t> wire_bytes_{0};
  std::atomic<int> wire_codec_{-1};
  std::unique_ptr<std::atomic<uint32_t>[]> conn_chunks_;

 private:
  void run_conn(void (Op::*body)(size_t), size_t conn);
  void join_all();

  std::vector<std::thread> threads_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> finished_{false};
  std::atomic<size_t> running_{0};
  std::mutex mu_;
  ErrorKind err_kind_ = ErrorKind::NONE;
  std::string err_msg_;
  bool joined_ = false;
};

class SendOp : public Op {
 public:
  SendOp(std::vector<int> fds, Buffer src, SendOptions opt);
  ~SendOp() override;

 private:
  void conn_body(size_t conn);
  Buffer src_;
  SendOptions opt_;
  uint32_t n_chunks_;
  std::atomic<uint32_t> next_chunk_{0};
};

class RecvOp : public Op {
 public:
  RecvOp(std::vector<int> fds, Buffer dst, RecvOptions opt);
  ~RecvOp() override;

 private:
  void conn_body(size_t conn);
  void on_all_done() override;
  // Claims chunk seq for this connection; throws PROTOCOL on an inconsistent
  // or duplicate chunk. Returns the chunk's element count.
  uint64_t claim_chunk(uint64_t chunk_elems, uint32_t n_chunks, uint32_t seq);
  void recv_accumulate_raw(int fd, float* acc, uint64_t elems, std::vector<uint8_t>& scratch);
  void recv_growing(int fd, const uint8_t* head, uint32_t len, std::vector<uint8_t>& buf);
  Buffer dst_;
  RecvOptions opt_;
  std::mutex seen_mu_;  // guards everything below
  uint64_t chunk_elems_ = 0;
  uint32_t n_chunks_ = 0;
  std::vector<uint8_t> seen_;
  uint32_t received_ = 0;
};

double monotonic_s();

}  // namespace plstream
