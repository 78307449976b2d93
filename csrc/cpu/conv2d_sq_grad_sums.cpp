// CPU kernel of conv2d_sq_grad_sums: sum over samples n of (dL_n/dW)^2 for a 2-D convolution
// (groups 1), where dL_n/dW = G_n P_n is sample n's weight gradient: G_n (Co, L) its output
// gradient, P_n (L, K) its patch rows. Schema in csrc/ops.cpp, argument checks in common.h.
//
// Why a kernel: OBD needs these sums for every conv. Formed as one grouped weight-gradient
// convolution per chunk of samples (the reference), layers with few output positions cost 3-9x a
// batched weight gradient, and mkldnn's grouped kernel does not speed up with a second thread
// (bench/RESULTS.md, issue #15). Here each task takes a range of samples and, per sample, copies
// the patch rows into a buffer of its own (memcpy of C contiguous values per tap, from the sample
// transposed to H, W, C), multiplies by BLAS (aten::mm through the dispatcher, one thread inside
// the parallel region), and adds the squares to its own accumulator; the accumulators are added
// at the end. Nothing of size N x weight is formed. Patch columns are ordered (ky, kx, c), so the
// last step permutes them to the weight's (c, ky, kx).
#include "../common.h"

#include <vector>

namespace pyobc {
namespace {

constexpr int64_t kTaskBytes = int64_t(256) << 20;

// Patch rows of one sample: rows[l, (ky * kw + kx) * C + c] = x[c, iy, ix] (0 in the padding),
// from the sample transposed to (H, W, C) in hwc.
template <typename T>
void patch_rows(const T* x, const Conv2dGeom& g, T* hwc, T* rows) {
  const int64_t C = g.C, HW = g.H * g.W;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < HW; ++i) hwc[i * C + c] = x[c * HW + i];
  const int64_t K = g.K();
  for (int64_t oy = 0; oy < g.Ho; ++oy)
    for (int64_t ox = 0; ox < g.Wo; ++ox) {
      T* row = rows + (oy * g.Wo + ox) * K;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        for (int64_t kx = 0; kx < g.kw; ++kx, row += C) {
          const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
          if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W)
            std::memset(row, 0, C * sizeof(T));
          else
            std::memcpy(row, hwc + (iy * g.W + ix) * C, C * sizeof(T));
        }
      }
    }
}

// a[i] += v[i]^2, one leaf per type (multiversioned: the loop runs once per sample over Co * K values,
// a 1/L share of the product's work, so it must vectorise)
#define PYOBC_DEFINE_LEAVES(T)                                                       \
  PYOBC_MULTIVERSION void add_squares(T* __restrict a, const T* __restrict v, int64_t n) { \
    for (int64_t i = 0; i < n; ++i) a[i] += v[i] * v[i];                             \
  }
PYOBC_DEFINE_LEAVES(float)
PYOBC_DEFINE_LEAVES(double)
#undef PYOBC_DEFINE_LEAVES

template <typename T>
void sq_sums_kernel(const Tensor& x, const Tensor& gout, const Conv2dGeom& g, T* out) {
  const int64_t L = g.L(), K = g.K(), CoK = g.Co * K;
  // a task holds its sums, one gradient, the patch rows and the transposed sample: at most kTaskBytes
  // for all tasks together (a 2048-channel 3x3 conv's sums alone are 151 MB per task), at least one task
  const int64_t task_bytes = (2 * CoK + L * K + g.C * g.H * g.W) * static_cast<int64_t>(sizeof(T));
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>({g.N, static_cast<int64_t>(torch::stable::get_num_threads()), kTaskBytes / task_bytes}));
  // squares summed in the input's type, as the reference does: all terms are >= 0 (no cancellation)
  std::vector<T> acc(static_cast<size_t>(tasks * CoK), T(0));
  const T* xp = x.const_data_ptr<T>();
  T* gp = const_cast<T*>(gout.const_data_ptr<T>());  // read only: the mm's input
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> hwc(static_cast<size_t>(g.C * g.H * g.W)), rows(static_cast<size_t>(L * K)),
        grad(static_cast<size_t>(CoK));
    const Tensor rows_t = contiguous_blob(rows.data(), {L, K}, x);
    const Tensor grad_t = contiguous_blob(grad.data(), {g.Co, K}, x);
    for (int64_t task = begin; task < end; ++task) {
      T* a = acc.data() + task * CoK;
      for (int64_t n = g.N * task / tasks; n < g.N * (task + 1) / tasks; ++n) {
        patch_rows(xp + n * g.C * g.H * g.W, g, hwc.data(), rows.data());
        matmul_into("aten::mm", contiguous_blob(gp + n * g.Co * L, {g.Co, L}, x), rows_t, grad_t);
        add_squares(a, grad.data(), CoK);
      }
    }
  });
  // tasks' sums added, columns permuted from (ky, kx, c) to the weight's (c, ky, kx)
  const int64_t taps = g.kh * g.kw;
  for (int64_t o = 0; o < g.Co; ++o)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < g.C; ++c) {
        T v = 0;
        for (int64_t task = 0; task < tasks; ++task) v += acc[task * CoK + o * K + t * g.C + c];
        out[(o * g.C + c) * taps + t] = v;
      }
}

Tensor conv2d_sq_grad_sums_cpu(Tensor x, Tensor g, std::vector<int64_t> kernel_size,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> dilation) {
  const Conv2dGeom geo = check_conv2d_sq_args(x, g, kernel_size, stride, padding, dilation);
  STD_TORCH_CHECK(x.is_cpu(), "conv2d_sq_grad_sums: CPU kernel called with non-CPU tensors");
  x = as_contiguous(x);
  g = as_contiguous(g);
  Tensor out = new_output({geo.Co, geo.C, geo.kh, geo.kw}, x.scalar_type(), x);
  if (out.numel() == 0) return out;
  if (geo.N == 0 || geo.L() == 0) {
    torch::stable::zero_(out);
    return out;
  }
  if (x.scalar_type() == ScalarType::Float)
    sq_sums_kernel<float>(x, g, geo, out.mutable_data_ptr<float>());
  else
    sq_sums_kernel<double>(x, g, geo, out.mutable_data_ptr<double>());
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CPU, m) {
  m.impl("conv2d_sq_grad_sums", TORCH_BOX(&conv2d_sq_grad_sums_cpu));
}

}  // namespace pyobc
