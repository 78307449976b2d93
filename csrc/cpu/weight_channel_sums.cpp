// CPU kernel of weight_channel_sums: for a (grouped) weight w and a same-shape t, the sums of
// w * t per out-channel and per in-channel, in one pass over memory. Schema in csrc/ops.cpp; the
// blocked dot products, accumulation types and work partitioning it shares with channel_dot are in
// channel_reduce.h.
//
// Tasks take consecutive out-channels: each writes its out-channel sums directly and adds its
// in-channel products to its own accumulator row, and the rows are added in task order at the end.
#include "channel_reduce.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <tuple>
#include <vector>

namespace pyobc {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

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

// The leaf, one non-template (multiversioned) function per element type.
#define PYOBC_DEFINE_LEAVES(T)                                                                    \
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
  m.impl("weight_channel_sums", TORCH_BOX(&weight_channel_sums_cpu));
}

}  // namespace pyobc
