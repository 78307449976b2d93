// CPU kernels of the index ops: csr_gather_sum, csr_gather_reduce and gather_channels.
//
// csr_gather_sum / csr_gather_reduce: out[r, i] = reduce over k in [rowptr[i], rowptr[i+1]) of
// (weight[k] *) values[r, col[k]]. One task per block of consecutive outputs (r, i); each output
// reduces its entries in the order of k, in a local accumulator (float64 for float32/float64
// values, float32 for float16/bfloat16), so results are deterministic and independent of the
// thread count. values is read in place with any strides (a row-batched view of a larger buffer
// costs no copy). The index maps are checked (once, sequentially, O(N + nnz)) before any read.
//
// gather_channels: every (tensor, dim, index) triple becomes a strided (outer, D, inner) block
// (csrc/common.h, GatherView); the output rows (outer x len(index)) of all tensors are cut into
// tasks of about 64 KiB and copied in ONE parallel region. Elements are moved as opaque 1/2/4/8/16
// byte units, so every fixed-size dtype works. Inputs that are not such a block (rare: e.g. a
// channels_last weight sliced on dim 0) are copied to a contiguous tensor first.
#include "../common.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstring>
#include <limits>
#include <type_traits>

namespace pyobc {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

template <typename T> struct AccOf { using type = double; };
template <> struct AccOf<Half> { using type = float; };
template <> struct AccOf<BFloat16> { using type = float; };

template <typename Acc, typename T>
inline Acc cvt(T x) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
    return static_cast<Acc>(static_cast<float>(x));
  } else {
    return static_cast<Acc>(x);
  }
}

template <typename T, typename Acc>
inline T narrow(Acc x) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
    return T(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

constexpr int64_t kGrain = 32768;           // elements of work below which a task is not split
constexpr int64_t kGrainBytes = 64 * 1024;  // bytes per gather_channels task

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// CSR gather-reduce
// ---------------------------------------------------------------------------------------------

// Branch-free scans of the index maps (vectorised; multiversioned for AVX2).
PYOBC_MULTIVERSION bool any_decreasing(const int64_t* __restrict p, int64_t n) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= p[i] > p[i + 1];
  return bad;
}

PYOBC_MULTIVERSION bool any_outside(const int64_t* __restrict p, int64_t n, int64_t size) {
  const uint64_t limit = static_cast<uint64_t>(size);  // negative entries wrap to huge values
  bool bad = false;
  for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint64_t>(p[k]) >= limit;
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
      if constexpr (decltype(m)::value == CsrReduce::Sum) {
        csr_sum<decltype(weighted)::value, T>(v, s.R, s.sr, s.ss, rp, cp, w, s.N, o, s.S);
      } else {
        csr_kernel<decltype(m)::value, false, T>(v, s.R, s.sr, s.ss, rp, cp, nullptr, s.N, o);
      }
    });
    return 0;
  });
  return out;
}

Tensor csr_gather_sum_cpu(Tensor values, Tensor rowptr, Tensor col, std::optional<Tensor> weight) {
  return csr_cpu(values, rowptr, col, weight, CsrReduce::Sum, "csr_gather_sum");
}

// ---------------------------------------------------------------------------------------------
// gather_channels
// ---------------------------------------------------------------------------------------------

struct Job {
  const char* src;
  char* dst;
  const int64_t* idx;
  int64_t nidx;
  int64_t esize;
  GatherView v;
};

struct Task {
  int64_t job, row_begin, row_end;
};

struct E16 {
  uint64_t lo, hi;
};

// n <= 64 bytes with at most four (overlapping) 16-byte moves: no loop, no libc call.
inline void copy_short(char* __restrict d, const char* __restrict s, int64_t n) {
  if (n >= 16) {
    std::memcpy(d, s, 16);
    if (n > 32) {
      std::memcpy(d + 16, s + 16, 16);
      std::memcpy(d + n - 32, s + n - 32, 16);
    }
    std::memcpy(d + n - 16, s + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(d, s, 8);
    std::memcpy(d + n - 8, s + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(d, s, 4);
    std::memcpy(d + n - 4, s + n - 4, 4);
  } else {
    for (int64_t b = 0; b < n; ++b) d[b] = s[b];
  }
}

// Output rows [r0, r1) of a job; a row is `inner` elements of E. (Everything is read into locals
// first: stores through the byte-typed destination could alias the Job's fields otherwise, and
// the compiler would reload them after every element.)
template <typename E>
void copy_rows(const Job& jb, int64_t r0, int64_t r1) {
  constexpr int64_t es = sizeof(E);
  const char* __restrict src = jb.src;
  const int64_t* __restrict idx = jb.idx;
  const int64_t inner = jb.v.inner, nidx = jb.nidx;
  const int64_t s_outer = jb.v.s_outer * es, s_dim = jb.v.s_dim * es;
  const int64_t step = (jb.v.s_inner == 1 || inner == 1 ? 1 : jb.v.s_inner) * es;
  const int64_t row_bytes = inner * es;
  const bool long_rows = step == es && row_bytes > 64;  // else a libc call costs more than the copy
  char* __restrict dst = jb.dst + r0 * row_bytes;
  int64_t o = r0 / nidx, j = r0 % nidx;
  for (int64_t r = r0; r < r1; ++r) {
    const char* s = src + o * s_outer + idx[j] * s_dim;
    if (long_rows) {
      std::memcpy(dst, s, static_cast<size_t>(row_bytes));
    } else if (step == es) {
      copy_short(dst, s, row_bytes);
    } else {
      for (int64_t n = 0; n < inner; ++n) std::memcpy(dst + n * es, s + n * step, es);
    }
    dst += row_bytes;
    if (++j == nidx) {
      j = 0;
      ++o;
    }
  }
}

void run_task(const Job& jb, int64_t r0, int64_t r1) {
  switch (jb.esize) {
    case 1: copy_rows<uint8_t>(jb, r0, r1); break;
    case 2: copy_rows<uint16_t>(jb, r0, r1); break;
    case 4: copy_rows<uint32_t>(jb, r0, r1); break;
    case 8: copy_rows<uint64_t>(jb, r0, r1); break;
    case 16: copy_rows<E16>(jb, r0, r1); break;
    default: break;  // rejected before
  }
}

std::vector<Tensor> gather_channels_cpu(std::vector<Tensor> tensors, std::vector<int64_t> dims,
                                        std::vector<Tensor> indices) {
  const std::vector<int64_t> dim = check_gather_args(tensors, dims, indices);
  const size_t n = tensors.size();
  std::vector<Tensor> outs, keep;
  outs.reserve(n);
  keep.reserve(2 * n);
  std::vector<Job> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    Tensor t = tensors[i];
    STD_TORCH_CHECK(t.is_cpu(), "gather_channels: CPU kernel called with non-CPU tensors[", i, "]");
    const int64_t d = dim[i];
    Tensor idx = as_contiguous(indices[i]);
    keep.push_back(idx);
    const int64_t nidx = idx.numel(), size = t.size(d);
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    if (any_outside(ip, nidx, size)) {
      const auto mm = std::minmax_element(ip, ip + nidx);
      STD_TORCH_CHECK(false, "gather_channels: indices[", i, "] has entries outside [0, ", size,
                      ") (the size of dim ", d, " of tensors[", i, "]): min ", *mm.first,
                      ", max ", *mm.second);
    }
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[d] = nidx;
    Tensor out = new_output(shape, t.scalar_type(), t);
    outs.push_back(out);
    Job& jb = jobs[i];
    if (!gather_view(t, d, &jb.v)) {
      t = torch::stable::contiguous(t);
      const bool ok = gather_view(t, d, &jb.v);
      STD_TORCH_CHECK(ok, "gather_channels: internal error, contiguous tensor not recognised");
    }
    keep.push_back(t);
    jb.esize = static_cast<int64_t>(t.element_size());
    STD_TORCH_CHECK(jb.esize == 1 || jb.esize == 2 || jb.esize == 4 || jb.esize == 8 ||
                        jb.esize == 16,
                    "gather_channels: unsupported element size ", jb.esize);
    jb.src = static_cast<const char*>(t.const_data_ptr());
    jb.dst = static_cast<char*>(out.mutable_data_ptr());
    jb.idx = ip;
    jb.nidx = nidx;
  }
  // cut every job's rows into tasks of about kGrainBytes
  std::vector<Task> tasks;
  int64_t total_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const Job& jb = jobs[i];
    const int64_t rows = jb.v.outer * jb.nidx;
    const int64_t row_bytes = jb.v.inner * jb.esize;
    if (rows == 0 || row_bytes == 0) continue;
    total_bytes += rows * row_bytes;
    const int64_t per_task = std::max<int64_t>(1, kGrainBytes / row_bytes);
    for (int64_t r = 0; r < rows; r += per_task)
      tasks.push_back({static_cast<int64_t>(i), r, std::min(rows, r + per_task)});
  }
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  if (ntasks == 0) return outs;
  // up to 1 MiB in all, the copy runs inline (grain = all tasks): a memory-bound copy gains
  // little from more cores, and waiting for pool threads on a busy machine costs milliseconds;
  // beyond, tasks of ~64 KiB run in parallel
  const int64_t grain = total_bytes < 16 * kGrainBytes ? ntasks : 1;
  torch::stable::parallel_for(0, ntasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task& tk = tasks[t];
      run_task(jobs[tk.job], tk.row_begin, tk.row_end);
    }
  });
  return outs;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CPU, m) {
  m.impl("csr_gather_sum", TORCH_BOX(&csr_gather_sum_cpu));
  m.impl("csr_gather_reduce", &csr_gather_reduce_boxed<&csr_cpu>);
  m.impl("gather_channels", TORCH_BOX(&gather_channels_cpu));
}

}  // namespace pyobc
