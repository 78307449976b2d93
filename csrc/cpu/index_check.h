// The bounds scan of index maps on CPU, shared by the CSR ops (csr_reduce.h) and gather_channels.
#pragma once

#include "../common.h"

#include <cstdint>

namespace pyobc {
namespace {

// Branch-free scan of an index map (vectorised; multiversioned for AVX2): true when an entry lies
// outside [0, size).
PYOBC_MULTIVERSION bool any_outside(const int64_t* __restrict p, int64_t n, int64_t size) {
  const uint64_t limit = static_cast<uint64_t>(size);  // negative entries wrap to huge values
  bool bad = false;
  for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint64_t>(p[k]) >= limit;
  return bad;
}

}  // namespace
}  // namespace pyobc
