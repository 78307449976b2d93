// CPU kernel of channel_scale: out = x * scale, scale broadcast along the channel dim (and along the
// leading dim when per_sample: scale is (N, C)). Schema in csrc/ops.cpp. It is the adjoint of
// channel_dot: the gated second-order passes multiply every gated activation by its gates, and the
// backward of that product is one channel_scale and one channel_dot (no full-size temporary).
//
// x is read as a dense (S, R, C, K) block (csrc/common.h) in place when its layout allows (the
// output then has x's strides), else from a contiguous copy. Work is split over the S*R rows.
#include "../common.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

namespace pyobc {
namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

// The product's compute type: float for the 16-bit floats (rounded once), the type itself else.
template <typename T>
using MulOf = std::conditional_t<sizeof(T) == 2, float, T>;

// `rows` rows of C*K elements: out[r, c, k] = x[r, c, k] * scale[c].
template <typename T>
PYOBC_INLINE void scale_rows_impl(const T* __restrict x, const T* __restrict scale, int64_t rows,
                                  int64_t C, int64_t K, T* __restrict out) {
  using M = MulOf<T>;
  for (int64_t r = 0; r < rows; ++r, x += C * K, out += C * K) {
    if (K == 1) {
      for (int64_t c = 0; c < C; ++c) out[c] = narrow<T>(cvt<M>(x[c]) * cvt<M>(scale[c]));
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      const M s = cvt<M>(scale[c]);
      const T* __restrict xc = x + c * K;
      T* __restrict oc = out + c * K;
      if constexpr (std::is_same_v<M, T>) {
        for (int64_t k = 0; k < K; ++k) oc[k] = xc[k] * s;  // float/double: a plain vector loop
      } else {
        for (int64_t k = 0; k < K; ++k) oc[k] = narrow<T>(cvt<M>(xc[k]) * s);
      }
    }
  }
}

#define PYOBC_DEFINE_LEAVES(T)                                                                  \
  PYOBC_MULTIVERSION void scale_rows(const T* x, const T* scale, int64_t rows, int64_t C,       \
                                     int64_t K, T* out) {                                       \
    scale_rows_impl<T>(x, scale, rows, C, K, out);                                              \
  }
PYOBC_DEFINE_LEAVES(float)
PYOBC_DEFINE_LEAVES(double)
PYOBC_DEFINE_LEAVES(Half)
PYOBC_DEFINE_LEAVES(BFloat16)
#undef PYOBC_DEFINE_LEAVES

template <typename T>
void channel_scale_kernel(const T* x, const T* scale, const Block& blk, T* out) {
  const int64_t R = blk.R, C = blk.C, K = blk.K, row = C * K;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, row));
  // rows of all samples in one range; a task's rows may span samples (scale row s = row / R)
  torch::stable::parallel_for(0, blk.S * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t s = i / R, stop = std::min(end, (s + 1) * R);
      scale_rows(x + i * row, scale + s * C, stop - i, C, K, out + i * row);
      i = stop;
    }
  });
}

Tensor channel_scale_cpu(Tensor x, Tensor scale, int64_t dim, bool per_sample) {
  dim = check_channel_scale_args(x, scale, dim, per_sample);
  STD_TORCH_CHECK(x.is_cpu(), "channel_scale: CPU kernel called with non-CPU tensors");
  Block blk;
  if (!dense_block(x, dim, per_sample, &blk)) {
    x = torch::stable::contiguous(x);
    dense_block(x, dim, per_sample, &blk);
  }
  scale = as_contiguous(scale);
  Tensor out = torch::stable::empty_like(x);  // dense x: the same strides, so the same block
  if (x.numel() == 0) return out;
  dispatch_float<float, double, Half, BFloat16>(x.scalar_type(), "channel_scale", [&](auto tag) {
    using T = decltype(tag);
    channel_scale_kernel<T>(x.const_data_ptr<T>(), scale.const_data_ptr<T>(), blk,
                            out.mutable_data_ptr<T>());
    return 0;
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CPU, m) {
  m.impl("channel_scale", TORCH_BOX(&channel_scale_cpu));
}

}  // namespace pyobc
