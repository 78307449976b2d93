// CUDA kernel of channel_scale: out = x * scale, scale broadcast along the channel dim (and along
// the leading dim when per_sample: scale is (N, C)). Schema in csrc/ops.cpp; the CPU kernel and the
// design notes are in csrc/cpu/channel_scale.cpp.
//
// x is read as a dense (S, R, C, K) block in place when its layout allows (the output has x's
// strides), else from a contiguous copy. One grid-stride loop over the elements; the channel of
// element i is (i / K) % C and its sample i / (R * C * K). Memory-bound: one read, one write.
#include "cuda_common.cuh"

namespace pyobc {
namespace {

using namespace cuda;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_scale_kernel(const T* __restrict__ x, const T* __restrict__ scale, int64_t n,
                         int64_t C, int64_t K, int64_t per_sample_elems, bool per_sample,
                         T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t c = (i / K) % C;
    const int64_t s = per_sample ? i / per_sample_elems : 0;
    out[i] = narrow_to<T>(widen(x[i]) * widen(scale[s * C + c]));
  }
}

Tensor channel_scale_cuda(Tensor x, Tensor scale, int64_t dim, bool per_sample) {
  dim = check_channel_scale_args(x, scale, dim, per_sample);
  STD_TORCH_CHECK(x.is_cuda(), "channel_scale: CUDA kernel called with non-CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Block blk;
  if (!dense_block(x, dim, per_sample, &blk)) {
    x = torch::stable::contiguous(x);
    dense_block(x, dim, per_sample, &blk);
  }
  scale = as_contiguous(scale);
  Tensor out = torch::stable::empty_like(x);  // dense x: the same strides, so the same block
  const int64_t n = x.numel();
  if (n == 0) return out;
  const Launch l = launch_context(x);
  const unsigned int grid = grid_for_items(n, kThreads * 4, l);
  dispatch_float<float, double, half_bits, bf16_bits>(x.scalar_type(), "channel_scale",
                                                       [&](auto tag) {
    using T = decltype(tag);
    channel_scale_kernel<T><<<grid, kThreads, 0, l.stream>>>(
        static_cast<const T*>(x.const_data_ptr()), static_cast<const T*>(scale.const_data_ptr()), n,
        blk.C, blk.K, blk.R * blk.C * blk.K, per_sample, static_cast<T*>(out.mutable_data_ptr()));
    return 0;
  });
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CUDA, m) {
  m.impl("channel_scale", TORCH_BOX(&channel_scale_cuda));
}

}  // namespace pyobc
