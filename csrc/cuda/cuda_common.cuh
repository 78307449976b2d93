// Shared device/host helpers of the pyobc CUDA kernels (stable-ABI headers only: no ATen/c10 CUDA
// headers, so the kernels compile-check against a CPU build of torch). Included by every
// csrc/cuda/*.cu; the host-side helpers shared with the CPU kernels (AccOf, OutOf, ceil_div, the
// argument checks) are in csrc/common.h, which this includes.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include "../common.h"

namespace pyobc {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;

// Storage types of the 16-bit floats (converted by hand, so no c10 type is needed on the device).
struct half_bits {
  uint16_t x;
};
struct bf16_bits {
  uint16_t x;
};

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(half_bits v) {
  return __half2float(__ushort_as_half(v.x));
}
__device__ __forceinline__ float widen(bf16_bits v) {
  return __uint_as_float(static_cast<unsigned int>(v.x) << 16);
}

// Rounds to the storage type (round to nearest even; NaN stays NaN).
template <typename T> __device__ __forceinline__ T narrow_to(float v);
template <typename T> __device__ __forceinline__ T narrow_to(double v);
template <> __device__ __forceinline__ float narrow_to<float>(float v) { return v; }
template <> __device__ __forceinline__ float narrow_to<float>(double v) {
  return static_cast<float>(v);
}
template <> __device__ __forceinline__ double narrow_to<double>(double v) { return v; }
template <> __device__ __forceinline__ double narrow_to<double>(float v) { return v; }
template <> __device__ __forceinline__ half_bits narrow_to<half_bits>(float v) {
  return {__half_as_ushort(__float2half_rn(v))};
}
template <> __device__ __forceinline__ half_bits narrow_to<half_bits>(double v) {
  return narrow_to<half_bits>(static_cast<float>(v));
}
template <> __device__ __forceinline__ bf16_bits narrow_to<bf16_bits>(float v) {
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>(0x7fc0)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
template <> __device__ __forceinline__ bf16_bits narrow_to<bf16_bits>(double v) {
  return narrow_to<bf16_bits>(static_cast<float>(v));
}

template <typename Acc> __device__ __forceinline__ Acc quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}
template <typename Acc> __device__ __forceinline__ Acc neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() {
  return __int_as_float(static_cast<int>(0xff800000u));
}
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

struct Launch {
  cudaStream_t stream;
  int64_t sms;
};

inline Launch launch_context(const Tensor& x) {
  const int32_t device = x.get_device_index();
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  int sms = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return {static_cast<cudaStream_t>(stream), static_cast<int64_t>(sms > 0 ? sms : 1)};
}

// Enough resident warps to keep the memory system busy.
inline int64_t target_warps(const Launch& l) { return l.sms * 48; }

inline unsigned int grid_for_items(int64_t items, int64_t per_block, const Launch& l) {
  const int64_t blocks = std::min<int64_t>(ceil_div(items, per_block), l.sms * 32);
  return static_cast<unsigned int>(std::max<int64_t>(blocks, 1));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace cuda
}  // namespace pyobc
