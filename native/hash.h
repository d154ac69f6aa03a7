// Fast non-cryptographic hashing of tensor bytes for bit-parity checks.
#pragma once
#include <cstddef>
#include <cstdint>

namespace plhash {
// XXH64 of len bytes at data (any alignment). Matches the reference xxHash
// XXH64 bit for bit, so peers on any machine agree.
uint64_t xxh64(const void* data, size_t len, uint64_t seed);
}  // namespace plhash
