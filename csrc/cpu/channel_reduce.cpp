// CPU kernels of the channel reductions: channel_dot and weight_channel_sums.
//
// Both read their inputs as a dense (S, R, C, K) block (see csrc/common.h), in place for contiguous,
// channels_last and other permuted dense layouts. Products are summed in short float32 blocks whose
// sums are accumulated in float64 (float32 for float16/bfloat16 input; float64 throughout for
// float64 input), see AccOf/InOf. No full-size temporary is created; the only scratch memory is
// one accumulator row of C (or I) values per task.
//
// The inner loops ("leaves") are compiled twice on x86-64 Linux with GCC, for the baseline ISA and
// for x86-64-v3 (AVX2+FMA), and picked at load time (ifunc), so one portable wheel still uses
// the wide vector units where they exist.
#include "../common.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <type_traits>
#include <vector>

#define PYOBC_INLINE inline __attribute__((always_inline))

namespace pyobc {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

// Accumulation. Products are summed in `In` over short blocks (at most 32 products per SIMD lane,
// or kBlockRows rows of a channel) and the block sums in `Acc` (float64 for float32/float64 input,
// float32 for float16/bfloat16). For float32 input, In = float32 keeps the SIMD width of the
// input (pure float64 accumulation measured 15-20% slower on 2-core x86 hosts, over the 10%
// budget) while the error stays that of a 32-term float32 sum, not of a long one.
template <typename T> struct AccOf { using type = double; };
template <> struct AccOf<Half> { using type = float; };
template <> struct AccOf<BFloat16> { using type = float; };
template <typename T> struct InOf { using type = typename AccOf<T>::type; };
template <> struct InOf<float> { using type = float; };

constexpr int64_t kDotBlock = 256;  // elements per In-block of a contiguous dot product
constexpr int64_t kBlockRows = 16;  // rows per In-block when the channel dim is innermost
constexpr int64_t kChunk = 512;     // channels per In-block buffer when the channel dim is innermost

template <typename Acc, typename T>
PYOBC_INLINE Acc cvt(T x) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
    return static_cast<Acc>(static_cast<float>(x));
  } else {
    return static_cast<Acc>(x);
  }
}

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

// `rows` rows of C*K elements, consecutive rows `row_stride` elements apart:
// acc[c] += sum_k a[row, c, k] * b[row, c, k].
template <typename Acc, typename In, typename T>
PYOBC_INLINE void rows_acc_impl(const T* __restrict a, const T* __restrict b, int64_t rows,
                                int64_t row_stride, int64_t C, int64_t K, Acc* __restrict acc) {
  if (K == 1) {
    // channel innermost: kBlockRows rows of a chunk of channels summed in In, then added to acc
    In tmp[kChunk];
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
      const int64_t r1 = std::min(rows, r0 + kBlockRows);
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cn = std::min(kChunk, C - c0);
        for (int64_t c = 0; c < cn; ++c) tmp[c] = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const T* pa = a + r * row_stride + c0;
          const T* pb = b + r * row_stride + c0;
          for (int64_t c = 0; c < cn; ++c) tmp[c] += cvt<In>(pa[c]) * cvt<In>(pb[c]);
        }
        for (int64_t c = 0; c < cn; ++c) acc[c0 + c] += static_cast<Acc>(tmp[c]);
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r, a += row_stride, b += row_stride) {
    for (int64_t c = 0; c < C; ++c) acc[c] += dot<Acc, In>(a + c * K, b + c * K, K);
  }
}

// Weight rows o in [o_begin, o_end) of a (O, R, Ig, K) block: out_sums[o] = sum of the products of
// row o; in_acc[(o / Og) * Ig + j] += the products of (o, j).
template <typename Acc, typename In, typename T, typename Out>
PYOBC_INLINE void weight_rows_impl(const T* __restrict w, const T* __restrict t, int64_t o_begin,
                                   int64_t o_end, int64_t R, int64_t Ig, int64_t K, int64_t Og,
                                   Acc* __restrict in_acc, Out* __restrict out_sums) {
  const int64_t row = R * Ig * K;
  if (K == 1) {
    // blocks of up to kBlockRows out-channels of one group, a chunk of in-channels at a time
    In tmp[kChunk];
    Acc rs[kBlockRows];
    for (int64_t o0 = o_begin; o0 < o_end;) {
      const int64_t g = o0 / Og;
      const int64_t o1 = std::min({o_end, o0 + kBlockRows, (g + 1) * Og});
      Acc* acc = in_acc + g * Ig;
      for (int64_t o = o0; o < o1; ++o) rs[o - o0] = 0;
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t c0 = 0; c0 < Ig; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, Ig - c0);
          for (int64_t c = 0; c < cn; ++c) tmp[c] = 0;
          for (int64_t o = o0; o < o1; ++o) {
            const T* pa = w + o * row + r * Ig + c0;
            const T* pb = t + o * row + r * Ig + c0;
            In sv[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t c = 0;
            for (; c + 8 <= cn; c += 8) {
              for (int j = 0; j < 8; ++j) {
                const In p = cvt<In>(pa[c + j]) * cvt<In>(pb[c + j]);
                tmp[c + j] += p;
                sv[j] += p;
              }
            }
            for (; c < cn; ++c) {
              const In p = cvt<In>(pa[c]) * cvt<In>(pb[c]);
              tmp[c] += p;
              sv[0] += p;
            }
            rs[o - o0] += static_cast<Acc>(((sv[0] + sv[1]) + (sv[2] + sv[3])) +
                                           ((sv[4] + sv[5]) + (sv[6] + sv[7])));
          }
          for (int64_t c = 0; c < cn; ++c) acc[c0 + c] += static_cast<Acc>(tmp[c]);
        }
      }
      for (int64_t o = o0; o < o1; ++o) out_sums[o] = static_cast<Out>(rs[o - o0]);
      o0 = o1;
    }
    return;
  }
  for (int64_t o = o_begin; o < o_end; ++o) {
    const T* a = w + o * row;
    const T* b = t + o * row;
    Acc* acc = in_acc + (o / Og) * Ig;
    Acc s[4] = {0, 0, 0, 0};
    for (int64_t r = 0; r < R; ++r, a += Ig * K, b += Ig * K) {
      for (int64_t c = 0; c < Ig; ++c) {
        const Acc p = dot<Acc, In>(a + c * K, b + c * K, K);
        acc[c] += p;
        s[c & 3] += p;
      }
    }
    out_sums[o] = static_cast<Out>((s[0] + s[1]) + (s[2] + s[3]));
  }
}

template <typename T>
using OutOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The leaves, one non-template (multiversioned) function per element type.
#define PYOBC_DEFINE_LEAVES(T)                                                                  \
  PYOBC_MULTIVERSION void rows_acc(const T* a, const T* b, int64_t rows, int64_t row_stride,    \
                                   int64_t C, int64_t K, AccOf<T>::type* acc) {                 \
    rows_acc_impl<AccOf<T>::type, InOf<T>::type>(a, b, rows, row_stride, C, K, acc);                           \
  }                                                                                             \
  PYOBC_MULTIVERSION void weight_rows(const T* w, const T* t, int64_t o0, int64_t o1, int64_t R, \
                                      int64_t Ig, int64_t K, int64_t Og, AccOf<T>::type* in_acc, \
                                      OutOf<T>* out_sums) {                                     \
    weight_rows_impl<AccOf<T>::type, InOf<T>::type>(w, t, o0, o1, R, Ig, K, Og, in_acc,         \
                                                    out_sums);                                  \
  }
PYOBC_DEFINE_LEAVES(float)
PYOBC_DEFINE_LEAVES(double)
PYOBC_DEFINE_LEAVES(Half)
PYOBC_DEFINE_LEAVES(BFloat16)
#undef PYOBC_DEFINE_LEAVES

// ---------------------------------------------------------------------------------------------
// Work partitioning
// ---------------------------------------------------------------------------------------------

// Work (in elements) below which a task is not worth splitting further.
constexpr int64_t kGrain = 32768;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t num_threads() {
  return std::max<int64_t>(1, static_cast<int64_t>(torch::stable::get_num_threads()));
}

inline int64_t num_tasks(int64_t work, int64_t max_tasks) {
  return std::max<int64_t>(1, std::min({num_threads(), ceil_div(work, kGrain), max_tasks}));
}

// Pads a per-task accumulator row to whole cache lines so tasks never share one.
inline int64_t padded(int64_t n) { return ceil_div(n, 8) * 8; }

// out[s, c] = sum_{r, k} a[s, r, c, k] * b[s, r, c, k]
template <typename T, typename Out>
void channel_dot_kernel(const T* a, const T* b, const Block& blk, Out* out) {
  using Acc = typename AccOf<T>::type;
  const int64_t S = blk.S, C = blk.C;
  // a single channel: each sample is one contiguous run, read as one long row
  const int64_t R = C == 1 ? 1 : blk.R, K = C == 1 ? blk.R * blk.K : blk.K;
  const int64_t threads = num_threads();
  const int64_t per_sample = R * C * K;

  if (S >= 4 * threads) {
    // Many samples (per_sample=True on a batch): one task per sample, its rows read front to back.
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, per_sample));
    torch::stable::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(static_cast<size_t>(C));
      for (int64_t s = begin; s < end; ++s) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        rows_acc(a + s * per_sample, b + s * per_sample, R, C * K, C, K, acc.data());
        for (int64_t c = 0; c < C; ++c) out[s * C + c] = static_cast<Out>(acc[c]);
      }
    });
    return;
  }

  if (C == 1) {
    // one run per sample: split each run into chunks across tasks, then add the chunk sums
    const int64_t chunks = std::max<int64_t>(1, std::min(4 * threads, ceil_div(K, kGrain)));
    std::vector<Acc> part(static_cast<size_t>(S * chunks), Acc(0));
    torch::stable::parallel_for(0, S * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / chunks, j = task % chunks;
        const int64_t k0 = K * j / chunks, k1 = K * (j + 1) / chunks;
        const int64_t off = s * K + k0;
        rows_acc(a + off, b + off, 1, k1 - k0, 1, k1 - k0, part.data() + task);
      }
    });
    for (int64_t s = 0; s < S; ++s) {
      Acc v = 0;
      for (int64_t j = 0; j < chunks; ++j) v += part[s * chunks + j];
      out[s] = static_cast<Out>(v);
    }
    return;
  }

  if (R < 4 * threads) {
    // Few rows (e.g. one NCHW image): tasks over blocks of channels; each task sums its block
    // over the rows, reading R runs of (block * K) contiguous elements.
    const int64_t blocks = std::max<int64_t>(
        1, std::min({C, 4 * threads, ceil_div(per_sample, kGrain)}));
    torch::stable::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / blocks, blk_i = task % blocks;
        const int64_t c0 = C * blk_i / blocks, c1 = C * (blk_i + 1) / blocks;
        acc.assign(static_cast<size_t>(c1 - c0), Acc(0));
        const int64_t off = s * per_sample + c0 * K;
        rows_acc(a + off, b + off, R, C * K, c1 - c0, K, acc.data());
        for (int64_t c = c0; c < c1; ++c) out[s * C + c] = static_cast<Out>(acc[c - c0]);
      }
    });
    return;
  }

  // Rows streamed front to back and split into tasks, each accumulating its own row of C partial
  // sums (NCHW batches, tokens (N, T, C) with dim=-1, channels_last, few channels).
  const int64_t Cp = padded(C);
  std::vector<Acc> buf;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t tasks = num_tasks(per_sample, R);
    buf.assign(static_cast<size_t>(tasks * Cp), Acc(0));
    const T* as = a + s * per_sample;
    const T* bs = b + s * per_sample;
    torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = R * t / tasks, r1 = R * (t + 1) / tasks;
        rows_acc(as + r0 * C * K, bs + r0 * C * K, r1 - r0, C * K, C, K, buf.data() + t * Cp);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      Acc v = 0;
      for (int64_t t = 0; t < tasks; ++t) v += buf[t * Cp + c];
      out[s * C + c] = static_cast<Out>(v);
    }
  }
}

// Weights as a block (O, R, Ig, K): out_sums[o] = sum of the products in out-channel o, and
// in_sums[g*Ig + j] = sum over o in group g of the products in (o, j). One pass over memory.
template <typename T, typename Out>
void weight_sums_kernel(const T* w, const T* t, const Block& blk, int64_t groups, Out* out_sums,
                        Out* in_sums) {
  using Acc = typename AccOf<T>::type;
  const int64_t O = blk.S, Ig = blk.C;
  // a single in-channel per group (depthwise): each out-channel row is one contiguous run
  const int64_t R = Ig == 1 ? 1 : blk.R, K = Ig == 1 ? blk.R * blk.K : blk.K;
  const int64_t Og = O / groups, I = groups * Ig, Ip = padded(I);
  const int64_t tasks = num_tasks(O * R * Ig * K, O);
  std::vector<Acc> buf(static_cast<size_t>(tasks * Ip), Acc(0));
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = O * task / tasks, o1 = O * (task + 1) / tasks;
      weight_rows(w, t, o0, o1, R, Ig, K, Og, buf.data() + task * Ip, out_sums);
    }
  });
  for (int64_t i = 0; i < I; ++i) {
    Acc v = 0;
    for (int64_t task = 0; task < tasks; ++task) v += buf[task * Ip + i];
    in_sums[i] = static_cast<Out>(v);
  }
}

Tensor channel_dot_cpu(Tensor a, Tensor b, int64_t dim, bool per_sample) {
  dim = check_channel_dot_args(a, b, dim, per_sample);
  STD_TORCH_CHECK(a.is_cpu(), "channel_dot: CPU kernel called with non-CPU tensors");
  const Block blk = resolve_block(a, b, dim, per_sample);
  const ScalarType odt = result_dtype(a.scalar_type());
  Tensor out = per_sample ? new_output({blk.S, blk.C}, odt, a) : new_output({blk.C}, odt, a);
  if (a.numel() == 0) {
    torch::stable::zero_(out);
    return out;
  }
  dispatch_float<float, double, Half, BFloat16>(a.scalar_type(), "channel_dot", [&](auto tag) {
    using T = decltype(tag);
    channel_dot_kernel<T, OutOf<T>>(a.const_data_ptr<T>(), b.const_data_ptr<T>(), blk,
                                    out.mutable_data_ptr<OutOf<T>>());
    return 0;
  });
  return out;
}

std::tuple<Tensor, Tensor> weight_channel_sums_cpu(Tensor w, Tensor t, int64_t groups) {
  check_weight_sums_args(w, t, groups);
  STD_TORCH_CHECK(w.is_cpu(), "weight_channel_sums: CPU kernel called with non-CPU tensors");
  const Block blk = resolve_block(w, t, 1, /*keep_lead=*/true);
  const ScalarType odt = result_dtype(w.scalar_type());
  Tensor out_sums = new_output({blk.S}, odt, w);
  Tensor in_sums = new_output({groups * blk.C}, odt, w);
  if (w.numel() == 0) {
    torch::stable::zero_(out_sums);
    torch::stable::zero_(in_sums);
    return {out_sums, in_sums};
  }
  dispatch_float<float, double, Half, BFloat16>(
      w.scalar_type(), "weight_channel_sums", [&](auto tag) {
        using T = decltype(tag);
        weight_sums_kernel<T, OutOf<T>>(w.const_data_ptr<T>(), t.const_data_ptr<T>(), blk, groups,
                                        out_sums.mutable_data_ptr<OutOf<T>>(),
                                        in_sums.mutable_data_ptr<OutOf<T>>());
        return 0;
      });
  return {out_sums, in_sums};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CPU, m) {
  m.impl("channel_dot", TORCH_BOX(&channel_dot_cpu));
  m.impl("weight_channel_sums", TORCH_BOX(&weight_channel_sums_cpu));
}

}  // namespace pyobc
