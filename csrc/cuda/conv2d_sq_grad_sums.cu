// CUDA kernel of conv2d_sq_grad_sums: sum over samples of the squared per-sample weight gradients of
// a 2-D convolution (groups 1). Schema in csrc/ops.cpp; the CPU kernel and the design notes are in
// csrc/cpu/conv2d_sq_grad_sums.cpp.
//
// Per chunk of samples (sized so that the patch rows and the gradients stay under kChunkBytes):
// one kernel copies the patch rows (m, L, K) with columns in the weight's (c, ky, kx) order, one
// batched product (aten::bmm through the dispatcher: cuBLAS) gives the per-sample gradients
// (m, Co, K), and one kernel adds their squares to the output, a thread per weight looping over
// the chunk's samples (coalesced: consecutive threads read consecutive weights).
#include "cuda_common.cuh"

namespace pyobc {
namespace {

using namespace cuda;

constexpr int64_t kChunkBytes = int64_t(256) << 20;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    patch_rows_kernel(const T* __restrict__ x, Conv2dGeom g, int64_t n0, int64_t items,
                      T* __restrict__ rows) {
  const int64_t K = g.C * g.kh * g.kw, L = g.Ho * g.Wo, taps = g.kh * g.kw;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += stride) {
    const int64_t k = i % K, l = (i / K) % L, s = i / (K * L);
    const int64_t c = k / taps, ky = (k % taps) / g.kw, kx = k % g.kw;
    const int64_t iy = (l / g.Wo) * g.sh - g.ph + ky * g.dh;
    const int64_t ix = (l % g.Wo) * g.sw - g.pw + kx * g.dw;
    const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
    rows[i] = inside ? x[(((n0 + s) * g.C + c) * g.H + iy) * g.W + ix] : T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_squares_kernel(const T* __restrict__ grads, int64_t m, int64_t n, T* __restrict__ acc) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    T v = acc[j];
    for (int64_t s = 0; s < m; ++s) {
      const T t = grads[s * n + j];
      v += t * t;
    }
    acc[j] = v;
  }
}

Tensor conv2d_sq_grad_sums_cuda(Tensor x, Tensor g, std::vector<int64_t> kernel_size,
                                std::vector<int64_t> stride, std::vector<int64_t> padding,
                                std::vector<int64_t> dilation) {
  const Conv2dGeom geo = check_conv2d_sq_args(x, g, kernel_size, stride, padding, dilation);
  STD_TORCH_CHECK(x.is_cuda(), "conv2d_sq_grad_sums: CUDA kernel called with non-CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  x = as_contiguous(x);
  g = as_contiguous(g);
  Tensor out = new_output({geo.Co, geo.C, geo.kh, geo.kw}, x.scalar_type(), x);
  torch::stable::zero_(out);
  const int64_t L = geo.L(), K = geo.K(), CoK = geo.Co * K;
  if (out.numel() == 0 || geo.N == 0 || L == 0) return out;
  const int64_t es = x.scalar_type() == ScalarType::Double ? 8 : 4;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(geo.N, kChunkBytes / ((L * K + CoK) * es)));
  Tensor rows = new_output({chunk, L, K}, x.scalar_type(), x);
  Tensor grads = new_output({chunk, geo.Co, K}, x.scalar_type(), x);
  const Launch l = launch_context(x);
  for (int64_t n0 = 0; n0 < geo.N; n0 += chunk) {
    const int64_t m = std::min(chunk, geo.N - n0);
    dispatch_float<float, double, float, float>(x.scalar_type(), "conv2d_sq_grad_sums", [&](auto tag) {
      using T = decltype(tag);
      const int64_t items = m * L * K;
      patch_rows_kernel<T><<<grid_for_items(items, kThreads * 4, l), kThreads, 0, l.stream>>>(
          static_cast<const T*>(x.const_data_ptr()), geo, n0, items, static_cast<T*>(rows.mutable_data_ptr()));
      STD_CUDA_KERNEL_LAUNCH_CHECK();
      T* gp = static_cast<T*>(g.mutable_data_ptr()) + n0 * geo.Co * L;  // read only: bmm's input
      matmul_into("aten::bmm", contiguous_blob(gp, {m, geo.Co, L}, x),
                  contiguous_blob(rows.mutable_data_ptr(), {m, L, K}, x),
                  contiguous_blob(grads.mutable_data_ptr(), {m, geo.Co, K}, x));
      add_squares_kernel<T><<<grid_for_items(CoK, kThreads, l), kThreads, 0, l.stream>>>(
          static_cast<const T*>(grads.const_data_ptr()), m, CoK, static_cast<T*>(out.mutable_data_ptr()));
      STD_CUDA_KERNEL_LAUNCH_CHECK();
      return 0;
    });
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CUDA, m) {
  m.impl("conv2d_sq_grad_sums", TORCH_BOX(&conv2d_sq_grad_sums_cuda));
}

}  // namespace pyobc
