// CPU kernel of channel_dot: out[(s,) c] = sum of a * b over every dim but the channel dim (and
// the leading dim when per_sample). Schema in csrc/ops.cpp; the blocked dot products, accumulation
// types and work partitioning it shares with weight_channel_sums are in channel_reduce.h.
//
// The dense (S, R, C, K) block is split into tasks by its shape (channel_dot_kernel): one task per
// sample for many samples, chunks of one run for a single channel, blocks of channels for few
// rows, else blocks of rows, each with its own row of C partial sums.
#include "channel_reduce.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <vector>

namespace pyobc {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

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

// The leaf, one non-template (multiversioned) function per element type.
#define PYOBC_DEFINE_LEAVES(T)                                                                  \
  PYOBC_MULTIVERSION void rows_acc(const T* a, const T* b, int64_t rows, int64_t row_stride,    \
                                   int64_t C, int64_t K, AccOf<T>::type* acc) {                 \
    rows_acc_impl<AccOf<T>::type, InOf<T>::type>(a, b, rows, row_stride, C, K, acc);            \
  }
PYOBC_DEFINE_LEAVES(float)
PYOBC_DEFINE_LEAVES(double)
PYOBC_DEFINE_LEAVES(Half)
PYOBC_DEFINE_LEAVES(BFloat16)
#undef PYOBC_DEFINE_LEAVES

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

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CPU, m) {
  m.impl("channel_dot", TORCH_BOX(&channel_dot_cpu));
}

}  // namespace pyobc
