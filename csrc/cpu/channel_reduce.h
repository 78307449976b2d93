// Per-channel dot machinery of the CPU channel reductions, shared by channel_dot.cpp and
// weight_channel_sums.cpp: the in-block accumulation type (InOf), the blocked dot products
// (dot_in, dot) and the work partitioning (num_threads, num_tasks, padded).
//
// Both ops read their inputs as a dense (S, R, C, K) block (see csrc/common.h), in place for
// contiguous, channels_last and other permuted dense layouts. Products are summed in short float32
// blocks whose sums are accumulated in float64 (float32 for float16/bfloat16 input; float64
// throughout for float64 input), see AccOf (csrc/common.h) and InOf. No full-size temporary is
// created; the only scratch memory is one accumulator row of C (or I) values per task.
//
// The inner loops ("leaves", defined in each op's file) are compiled twice on x86-64 Linux with
// GCC, for the baseline ISA and for x86-64-v3 (AVX2+FMA), and picked at load time (ifunc), so one
// portable wheel still uses the wide vector units where they exist.
//
// Everything here has internal linkage, as if written in the including .cpp: each op's file
// compiles only what it uses.
#pragma once

#include "../common.h"

#include <algorithm>
#include <cstdint>

namespace pyobc {
namespace {

// Accumulation. Products are summed in `In` over short blocks (at most 32 products per SIMD lane,
// or kBlockRows rows of a channel) and the block sums in `Acc` (float64 for float32/float64 input,
// float32 for float16/bfloat16). For float32 input, In = float32 keeps the SIMD width of the
// input (pure float64 accumulation measured 15-20% slower on 2-core x86 hosts, over the 10%
// budget) while the error stays that of a 32-term float32 sum, not of a long one.
template <typename T> struct InOf { using type = typename AccOf<T>::type; };
template <> struct InOf<float> { using type = float; };

constexpr int64_t kDotBlock = 256;  // elements per In-block of a contiguous dot product
constexpr int64_t kBlockRows = 16;  // rows per In-block when the channel dim is innermost
constexpr int64_t kChunk = 512;     // channels per In-block buffer when the channel dim is innermost

// sum_k a[k] * b[k] in In with 8 independent partial sums (SIMD without reassociating one
// accumulator).
template <typename In, typename T>
PYOBC_INLINE In dot_in(const T* __restrict a, const T* __restrict b, int64_t n) {
  In s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += cvt<In>(a[i + j]) * cvt<In>(b[i + j]);
  }
  In tail = 0;
  for (; i < n; ++i) tail += cvt<In>(a[i]) * cvt<In>(b[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// sum_k a[k] * b[k]: blocks of kDotBlock elements summed in In, block sums in Acc. Short runs
// (e.g. 3x3 kernels) are summed in Acc directly: the narrower type gains nothing there.
template <typename Acc, typename In, typename T>
PYOBC_INLINE Acc dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  if (n < 32) return dot_in<Acc>(a, b, n);
  Acc total = 0;
  int64_t i = 0;
  for (; i + kDotBlock <= n; i += kDotBlock) {
    total += static_cast<Acc>(dot_in<In>(a + i, b + i, kDotBlock));
  }
  if (i < n) total += static_cast<Acc>(dot_in<In>(a + i, b + i, n - i));
  return total;
}

// ---------------------------------------------------------------------------------------------
// Work partitioning
// ---------------------------------------------------------------------------------------------

inline int64_t num_threads() {
  return std::max<int64_t>(1, static_cast<int64_t>(torch::stable::get_num_threads()));
}

inline int64_t num_tasks(int64_t work, int64_t max_tasks) {
  return std::max<int64_t>(1, std::min({num_threads(), ceil_div(work, kGrain), max_tasks}));
}

// Pads a per-task accumulator row to whole cache lines so tasks never share one.
inline int64_t padded(int64_t n) { return ceil_div(n, 8) * 8; }

}  // namespace
}  // namespace pyobc
