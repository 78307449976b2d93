// Machinery of the CUDA channel reductions, shared by channel_dot.cu and weight_channel_sums.cu:
// vector loads (Pack, kVec), the widening product (mul) and the work split (rows_per_split).
//
// Inputs are read as the dense (S, R, C, K) block of csrc/common.h. Each work item belongs to one
// warp (8 warps per block, grid-stride over items; about 48 items per SM) and writes its partial
// sums to a workspace, one writer per entry; a second small kernel adds the partials in a fixed
// order and converts to the output dtype. So results are deterministic (no atomics), and the
// workspace holds one value per (item, output entry): far smaller than the input (an item
// reduces at least 8 rows, or at least 4 loads per lane) and bounded by items x output size.
// Accumulation (AccOf, csrc/common.h): float64 for float32/float64 input, float32 for
// float16/bfloat16. Loads are 16-byte vectors when the sizes and base addresses allow it.
//
// Everything here has internal linkage, as if written in the including .cu.
#pragma once

#include "cuda_common.cuh"

namespace pyobc {
namespace {

using namespace pyobc::cuda;

// V consecutive elements loaded as one 16-byte (or narrower) transaction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename Acc, typename T>
__device__ __forceinline__ Acc mul(T a, T b) {
  return static_cast<Acc>(widen(a)) * static_cast<Acc>(widen(b));
}

// Splits n rows into chunks of at least min_rows so that base_items * chunks ~ target.
// Splits n rows into chunks of at least min_rows so that base_items * chunks ~ target.
inline int64_t rows_per_split(int64_t n, int64_t base_items, int64_t target, int64_t min_rows) {
  const int64_t wanted = std::max<int64_t>(1, ceil_div(target, std::max<int64_t>(base_items, 1)));
  return std::max<int64_t>(std::max<int64_t>(min_rows, 1), ceil_div(n, wanted));
}

}  // namespace
}  // namespace pyobc
