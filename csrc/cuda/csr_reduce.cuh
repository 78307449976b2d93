// CSR reduction kernels of CUDA, shared by csr_gather_sum.cu and csr_gather_reduce.cu: the
// per-output reduction state (Reducer), the thread- and warp-per-output kernels, and the host
// entry csr_cuda.
//
// One thread per output (r, i) (consecutive threads take consecutive i, so rowptr reads and output
// writes coalesce), or one warp per output when rows hold 32+ entries on average (lanes stride over
// the entries, then a fixed butterfly). Each output is reduced in a fixed order by one
// thread/warp: deterministic, no atomics, one launch. The index maps are not validated on the host
// (that needs a device sync; the Python wrapper does it unless check=False): the kernel never
// reads out of bounds, and an output whose rowptr entries are inconsistent or whose entries point
// outside [0, S) is NaN.
//
// Everything here has internal linkage, as if written in the including .cu: each op's file
// compiles only the kernels it uses.
#pragma once

#include "cuda_common.cuh"

#include <optional>

namespace pyobc {
namespace {

using namespace pyobc::cuda;

// Running state of one output's reduction; combine() merges two partial states (warp variant).
template <CsrReduce M, typename Acc>
struct Reducer {
  Acc value;
  int64_t count;
  __device__ __forceinline__ Reducer() : value(M == CsrReduce::Amax ? neg_inf<Acc>() : Acc(0)), count(0) {}
  __device__ __forceinline__ void add(Acc x) {
    if constexpr (M == CsrReduce::Amax) {
      if (x > value || x != x) value = (value != value) ? value : x;  // NaN sticks
    } else if constexpr (M == CsrReduce::Sum) {
      value += x;
    } else {
      value += x;
      count += x != Acc(0);  // NaN counts as non-zero
    }
  }
  __device__ __forceinline__ void combine(const Reducer& o) {
    if constexpr (M == CsrReduce::Amax) {
      add(o.value);
    } else {
      value += o.value;
      count += o.count;
    }
  }
  __device__ __forceinline__ Acc result() const {
    if constexpr (M == CsrReduce::CountNonzero) return static_cast<Acc>(count);
    if constexpr (M == CsrReduce::MeanNonzero)
      return value / static_cast<Acc>(count > 0 ? count : 1);
    return value;
  }
};

template <typename T, CsrReduce M, bool Weighted>
__global__ void __launch_bounds__(kThreads)
    csr_thread_per_output(const T* __restrict__ v, int64_t R, int64_t S, int64_t sr, int64_t ss,
                          const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                          const T* __restrict__ w, int64_t N, int64_t nnz, T* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  const int64_t total = R * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += stride) {
    const int64_t r = o / N, i = o - r * N;
    const int64_t k0 = rowptr[i], k1 = rowptr[i + 1];
    bool bad = k0 < 0 || k1 < k0 || k1 > nnz;
    Reducer<M, Acc> red;
    if (!bad) {
      const T* vr = v + r * sr;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = col[k];
        if (c < 0 || c >= S) {
          bad = true;
          break;
        }
        Acc x = static_cast<Acc>(widen(vr[c * ss]));
        if constexpr (Weighted) x *= static_cast<Acc>(widen(w[k]));
        red.add(x);
      }
    }
    out[o] = narrow_to<T>(bad ? quiet_nan<Acc>() : red.result());
  }
}

template <CsrReduce M, typename Acc>
__device__ __forceinline__ Reducer<M, Acc> warp_reduce(Reducer<M, Acc> red) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    Reducer<M, Acc> other;
    other.value = __shfl_xor_sync(0xffffffffu, red.value, off);
    other.count = __shfl_xor_sync(0xffffffffu, red.count, off);
    red.combine(other);
  }
  return red;
}

template <typename T, CsrReduce M, bool Weighted>
__global__ void __launch_bounds__(kThreads)
    csr_warp_per_output(const T* __restrict__ v, int64_t R, int64_t S, int64_t sr, int64_t ss,
                        const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                        const T* __restrict__ w, int64_t N, int64_t nnz, T* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t total = R * N;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       o < total; o += warp_stride) {  // warp-uniform loop
    const int64_t r = o / N, i = o - r * N;
    const int64_t k0 = rowptr[i], k1 = rowptr[i + 1];
    int bad = k0 < 0 || k1 < k0 || k1 > nnz;
    Reducer<M, Acc> red;
    if (!bad) {
      const T* vr = v + r * sr;
      for (int64_t k = k0 + lane; k < k1; k += kWarpSize) {
        const int64_t c = col[k];
        if (c < 0 || c >= S) {
          bad = 1;
          break;
        }
        Acc x = static_cast<Acc>(widen(vr[c * ss]));
        if constexpr (Weighted) x *= static_cast<Acc>(widen(w[k]));
        red.add(x);
      }
    }
    red = warp_reduce<M, Acc>(red);  // every lane reaches this point
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) out[o] = narrow_to<T>(bad ? quiet_nan<Acc>() : red.result());
  }
}

template <typename T, CsrReduce M, bool Weighted>
void launch_csr(const Launch& l, bool warp_mode, const void* v, int64_t R, int64_t S, int64_t sr,
                int64_t ss, const int64_t* rowptr, const int64_t* col, const void* w, int64_t N,
                int64_t nnz, void* out) {
  const T* pv = static_cast<const T*>(v);
  const T* pw = static_cast<const T*>(w);
  T* po = static_cast<T*>(out);
  if (warp_mode) {
    const unsigned int grid = grid_for_items(R * N, kWarpsPerBlock, l);
    csr_warp_per_output<T, M, Weighted>
        <<<grid, kThreads, 0, l.stream>>>(pv, R, S, sr, ss, rowptr, col, pw, N, nnz, po);
  } else {
    const unsigned int grid = grid_for_items(R * N, kThreads, l);
    csr_thread_per_output<T, M, Weighted>
        <<<grid, kThreads, 0, l.stream>>>(pv, R, S, sr, ss, rowptr, col, pw, N, nnz, po);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA entry of both CSR ops, with the signature of CsrImpl (csrc/common.h). SumOp selects
// the reductions it compiles: true for csr_gather_sum (sums, weighted or not), false for
// csr_gather_reduce (the others), so each op's file instantiates only its own kernels.
template <bool SumOp>
Tensor csr_cuda(const Tensor& values, const Tensor& rowptr_in, const Tensor& col_in,
                const std::optional<Tensor>& weight_in, CsrReduce mode, const char* op) {
  check_csr_args(values, rowptr_in, col_in, weight_in, op);
  STD_TORCH_CHECK(values.is_cuda(), op, ": CUDA kernel called with non-CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(values.get_device_index());
  const Tensor rowptr = as_contiguous(rowptr_in);
  const Tensor col = as_contiguous(col_in);
  std::optional<Tensor> weight;
  if (weight_in.has_value()) weight = as_contiguous(*weight_in);
  const CsrShape s = csr_shape(values, rowptr);
  const int64_t nnz = col.numel();
  Tensor out = csr_output(values, s);
  if (s.R * s.N == 0) return out;
  const Launch l = launch_context(values);
  const bool warp_mode = nnz >= 32 * s.N;  // rows of 32+ entries on average
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int64_t* cp = col.const_data_ptr<int64_t>();
  const void* v = values.const_data_ptr();
  const void* w = weight.has_value() ? weight->const_data_ptr() : nullptr;
  void* o = out.mutable_data_ptr();
  dispatch_float<float, double, half_bits, bf16_bits>(values.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    with_csr_mode(mode, w != nullptr, [&](auto m, auto weighted) {
      // (csr_gather_sum always sums and csr_gather_reduce never does: the other two combinations
      // do not occur and compile to nothing)
      if constexpr ((decltype(m)::value == CsrReduce::Sum) == SumOp) {
        launch_csr<T, decltype(m)::value, decltype(weighted)::value>(
            l, warp_mode, v, s.R, s.S, s.sr, s.ss, rp, cp, w, s.N, nnz, o);
      }
    });
    return 0;
  });
  return out;
}

}  // namespace
}  // namespace pyobc
