// CSR gather-reduce machinery of the CPU kernels, shared by csr_gather_sum.cpp and
// csr_gather_reduce.cpp: the index-map checks, the per-output reductions, the row-block sums and
// the host entry csr_cpu.
//
// out[r, i] = reduce over k in [rowptr[i], rowptr[i+1]) of (weight[k] *) values[r, col[k]]. One
// task per block of consecutive outputs (r, i); each output reduces its entries in the order of k,
// in a local accumulator (float64 for float32/float64 values, float32 for float16/bfloat16), so
// results are deterministic and independent of the thread count. values is read in place with any
// strides (a row-batched view of a larger buffer costs no copy). The index maps are checked (once,
// sequentially, O(N + nnz)) before any read.
//
// Everything here has internal linkage, as if written in the including .cpp: each op's file
// compiles only the kernels it uses.
#pragma once

#include "../common.h"
#include "index_check.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

namespace pyobc {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

// Branch-free scan of rowptr (vectorised; multiversioned for AVX2): true when it decreases anywhere.
PYOBC_MULTIVERSION bool any_decreasing(const int64_t* __restrict p, int64_t n) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= p[i] > p[i + 1];
  return bad;
}

// rowptr: N+1 offsets from 0 to nnz, non-decreasing; col: nnz entries in [0, S). The details of
// a failure are looked up only when one is found.
void check_csr_data(const int64_t* rowptr, int64_t n, const int64_t* col, int64_t nnz, int64_t S,
                    const char* op) {
  STD_TORCH_CHECK(rowptr[0] == 0, op, ": rowptr[0] must be 0, got ", rowptr[0]);
  if (any_decreasing(rowptr, n)) {
    for (int64_t i = 0; i < n; ++i) {
      STD_TORCH_CHECK(rowptr[i] <= rowptr[i + 1], op, ": rowptr must be non-decreasing, got rowptr[",
                      i, "]=", rowptr[i], " > rowptr[", i + 1, "]=", rowptr[i + 1]);
    }
  }
  STD_TORCH_CHECK(rowptr[n] == nnz, op, ": rowptr[-1]=", rowptr[n],
                  " must equal the number of entries col.numel()=", nnz);
  if (any_outside(col, nnz, S)) {
    const auto mm = std::minmax_element(col, col + nnz);
    STD_TORCH_CHECK(false, op, ": col has entries outside [0, ", S,
                    ") (the last dim of values): min ", *mm.first, ", max ", *mm.second);
  }
}

// One output: reduce entries [k0, k1) of row r (vr = values + r * stride_r).
template <CsrReduce M, bool Weighted, typename T>
inline T reduce_one(const T* __restrict vr, int64_t ss, const int64_t* __restrict col,
                    const T* __restrict w, int64_t k0, int64_t k1) {
  using Acc = typename AccOf<T>::type;
  if constexpr (M == CsrReduce::Sum) {
    Acc acc = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const Acc x = cvt<Acc>(vr[col[k] * ss]);
      if constexpr (Weighted) {
        acc += cvt<Acc>(w[k]) * x;
      } else {
        acc += x;
      }
    }
    return narrow<T>(acc);
  } else if constexpr (M == CsrReduce::Amax) {
    Acc m = -std::numeric_limits<Acc>::infinity();
    for (int64_t k = k0; k < k1; ++k) {
      const Acc x = cvt<Acc>(vr[col[k] * ss]);
      if (x > m || x != x) m = x;  // NaN propagates (and then stays: nothing is > NaN)
      if (m != m) break;
    }
    return narrow<T>(m);
  } else {
    Acc sum = 0;
    int64_t count = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const Acc x = cvt<Acc>(vr[col[k] * ss]);
      sum += x;
      count += x != Acc(0);  // NaN counts as non-zero
    }
    if constexpr (M == CsrReduce::CountNonzero) {
      return narrow<T>(static_cast<Acc>(count));
    } else {
      return narrow<T>(sum / static_cast<Acc>(count > 0 ? count : 1));
    }
  }
}

// Outputs [begin, end) of the flattened (R, N) output. (A plain function with restrict pointers:
// inside a lambda capturing by reference, every store to `out` would force the compiler to
// reload the captured pointers and sizes.)
template <CsrReduce M, bool Weighted, typename T>
void csr_range(const T* __restrict v, int64_t sr, int64_t ss, const int64_t* __restrict rowptr,
               const int64_t* __restrict col, const T* __restrict w, int64_t N,
               T* __restrict out, int64_t begin, int64_t end) {
  int64_t r = begin / N, i = begin % N;
  while (begin < end) {
    const T* vr = v + r * sr;
    const int64_t stop = std::min(end, begin + (N - i));  // the end of this row's outputs
    T* o = out + begin - i;
    for (; i < N && begin < stop; ++i, ++begin) {
      o[i] = reduce_one<M, Weighted, T>(vr, ss, col, w, rowptr[i], rowptr[i + 1]);
    }
    i = 0;
    ++r;
  }
}

template <CsrReduce M, bool Weighted, typename T>
void csr_kernel(const T* v, int64_t R, int64_t sr, int64_t ss, const int64_t* rowptr,
                const int64_t* col, const T* w, int64_t N, T* out) {
  const int64_t total = R * N;
  if (total == 0) return;
  const int64_t nnz = rowptr[N];
  // about kGrain entries (plus one per output) per task
  const int64_t per_output = std::max<int64_t>(1, (nnz + N) / std::max<int64_t>(N, 1));
  const int64_t grain = std::max<int64_t>(1, kGrain / per_output);
  torch::stable::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    csr_range<M, Weighted, T>(v, sr, ss, rowptr, col, w, N, out, begin, end);
  });
}

// Sums for rows [0, R) when R is a multiple of RB: each task takes a block of RB rows and a chunk
// of outputs, and reads every entry's column index once for all rows of the block. Per output,
// the entries are added in the order of k, exactly as in csr_kernel.
template <int64_t kRowBlock, bool Weighted, typename T>
void csr_row_block(const T* __restrict vb, int64_t sr, int64_t ss,
                   const int64_t* __restrict rowptr, const int64_t* __restrict col,
                   const T* __restrict w, int64_t N, T* __restrict ob, int64_t i0, int64_t i1) {
  using Acc = typename AccOf<T>::type;
  for (int64_t i = i0; i < i1; ++i) {
    Acc acc[kRowBlock] = {};
    const int64_t k1 = rowptr[i + 1];
    for (int64_t k = rowptr[i]; k < k1; ++k) {
      const T* p = vb + col[k] * ss;
      if constexpr (Weighted) {
        const Acc wk = cvt<Acc>(w[k]);
        for (int64_t r = 0; r < kRowBlock; ++r) acc[r] += wk * cvt<Acc>(p[r * sr]);
      } else {
        for (int64_t r = 0; r < kRowBlock; ++r) acc[r] += cvt<Acc>(p[r * sr]);
      }
    }
    for (int64_t r = 0; r < kRowBlock; ++r) ob[r * N + i] = narrow<T>(acc[r]);
  }
}

template <int64_t kRowBlock, bool Weighted, typename T>
void csr_sum_row_blocks(const T* v, int64_t R, int64_t sr, int64_t ss, const int64_t* rowptr,
                        const int64_t* col, const T* w, int64_t N, T* out) {
  const int64_t blocks = R / kRowBlock;
  const int64_t nnz = rowptr[N];
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(N, ceil_div(kRowBlock * (nnz + N), kGrain)));
  torch::stable::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / chunks, ch = task % chunks;
      csr_row_block<kRowBlock, Weighted, T>(v + rb * kRowBlock * sr, sr, ss, rowptr, col, w, N,
                                 out + rb * kRowBlock * N, N * ch / chunks, N * (ch + 1) / chunks);
    }
  });
}

// Row blocks pay off while a block of rows stays in cache (the gathers are random within a row):
// the widest block of 8, 4 or 2 rows that fits in kRowBlockBytes; else one row at a time.
constexpr int64_t kRowBlockBytes = 512 * 1024;

template <bool Weighted, typename T>
void csr_sum(const T* v, int64_t R, int64_t sr, int64_t ss, const int64_t* rowptr,
             const int64_t* col, const T* w, int64_t N, T* out, int64_t S) {
  const int64_t row_bytes = std::max<int64_t>(1, S * ss * static_cast<int64_t>(sizeof(T)));
  int64_t rb = 1;
  for (int64_t b : {8, 4, 2}) {
    if (R >= b && b * row_bytes <= kRowBlockBytes) {
      rb = b;
      break;
    }
  }
  const int64_t full = N > 0 ? R / rb * rb : 0;
  if (rb == 8) csr_sum_row_blocks<8, Weighted, T>(v, full, sr, ss, rowptr, col, w, N, out);
  if (rb == 4) csr_sum_row_blocks<4, Weighted, T>(v, full, sr, ss, rowptr, col, w, N, out);
  if (rb == 2) csr_sum_row_blocks<2, Weighted, T>(v, full, sr, ss, rowptr, col, w, N, out);
  if (rb == 1) {
    csr_kernel<CsrReduce::Sum, Weighted, T>(v, R, sr, ss, rowptr, col, w, N, out);
  } else if (full < R) {
    csr_kernel<CsrReduce::Sum, Weighted, T>(v + full * sr, R - full, sr, ss, rowptr, col, w, N,
                                            out + full * N);
  }
}

// The CPU entry of both CSR ops, with the signature of CsrImpl (csrc/common.h). SumOp selects the
// reductions it compiles: true for csr_gather_sum (sums, weighted or not), false for
// csr_gather_reduce (the others), so each op's file instantiates only its own kernels.
template <bool SumOp>
Tensor csr_cpu(const Tensor& values, const Tensor& rowptr_in, const Tensor& col_in,
               const std::optional<Tensor>& weight_in, CsrReduce mode, const char* op) {
  check_csr_args(values, rowptr_in, col_in, weight_in, op);
  STD_TORCH_CHECK(values.is_cpu(), op, ": CPU kernel called with non-CPU tensors");
  const Tensor rowptr = as_contiguous(rowptr_in);
  const Tensor col = as_contiguous(col_in);
  std::optional<Tensor> weight;
  if (weight_in.has_value()) weight = as_contiguous(*weight_in);
  const CsrShape s = csr_shape(values, rowptr);
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int64_t* cp = col.const_data_ptr<int64_t>();
  check_csr_data(rp, s.N, cp, col.numel(), s.S, op);
  Tensor out = csr_output(values, s);
  dispatch_float<float, double, Half, BFloat16>(values.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* v = values.const_data_ptr<T>();
    const T* w = weight.has_value() ? weight->const_data_ptr<T>() : nullptr;
    T* o = out.mutable_data_ptr<T>();
    with_csr_mode(mode, w != nullptr, [&](auto m, auto weighted) {
      // (csr_gather_sum always sums and csr_gather_reduce never does: the other two combinations
      // do not occur and compile to nothing)
      constexpr bool sum = decltype(m)::value == CsrReduce::Sum;
      if constexpr (sum && SumOp) {
        csr_sum<decltype(weighted)::value, T>(v, s.R, s.sr, s.ss, rp, cp, w, s.N, o, s.S);
      } else if constexpr (!sum && !SumOp) {
        csr_kernel<decltype(m)::value, false, T>(v, s.R, s.sr, s.ss, rp, cp, nullptr, s.N, o);
      }
    });
    return 0;
  });
  return out;
}

}  // namespace
}  // namespace pyobc
