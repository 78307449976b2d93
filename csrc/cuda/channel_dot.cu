// CUDA kernel of channel_dot: out[(s,) c] = sum of a * b over every dim but the channel dim (and
// the leading dim when per_sample). Schema in csrc/ops.cpp; the vector loads, product and work
// split it shares with weight_channel_sums are in channel_reduce.cuh (with the design notes).
//
// Stable-ABI headers only (no ATen/c10 CUDA headers): the current stream comes from
// aoti_torch_get_current_cuda_stream, the device guard from torch::stable::accelerator.
//
// Two kernels by the inner size K: lanes over channels (small K: channel innermost or nearly) or
// lanes over the K elements of one channel (large K: NCHW activations); then sum_splits adds up
// the partial sums of the row splits.
#include "channel_reduce.cuh"

namespace pyobc {
namespace {

// ---------------------------------------------------------------------------------------------
// channel_dot, small K (channel innermost or nearly): lanes over channels.
// A row holds C*K elements; `lpr` lanes (a power of two <= 32) cover one channel tile of lpr*V
// channels of a row, so a warp step covers 32/lpr consecutive rows (small C keeps all lanes busy).
// item = (s, split, channel tile); partial sums go to part[(s*C + c)*nsplit + split].
// V > 1 only when K == 1, C % V == 0 and both base pointers are 16-byte aligned.
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc, int V>
__global__ void __launch_bounds__(kThreads)
    channel_dot_lanes_over_c(const T* __restrict__ a, const T* __restrict__ b, int64_t S,
                             int64_t R, int64_t C, int64_t K, int64_t rows_per_split,
                             int64_t nsplit, int64_t ntiles, int lpr, Acc* __restrict__ part) {
  const int lane = threadIdx.x % kWarpSize;
  const int row_in_step = lane / lpr;       // which of the step's rows this lane reads
  const int rows_per_step = kWarpSize / lpr;
  const int64_t n_items = S * nsplit * ntiles;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       item < n_items; item += warp_stride) {
    const int64_t tile = item % ntiles;
    const int64_t split = (item / ntiles) % nsplit;
    const int64_t s = item / (ntiles * nsplit);
    const int64_t c0 = (tile * lpr + lane % lpr) * V;
    const bool active = c0 < C;  // inactive lanes still take part in the shuffles below
    const int64_t r0 = split * rows_per_split;
    const int64_t r1 = r0 + rows_per_split < R ? r0 + rows_per_split : R;
    Acc acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = Acc(0);
    if (active) {
      if constexpr (V > 1) {
        using P = Pack<T, V>;
#pragma unroll 4
        for (int64_t r = r0 + row_in_step; r < r1; r += rows_per_step) {
          const int64_t off = (s * R + r) * C + c0;
          const P pa = *reinterpret_cast<const P*>(a + off);
          const P pb = *reinterpret_cast<const P*>(b + off);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += mul<Acc>(pa.v[j], pb.v[j]);
        }
      } else {
        for (int64_t r = r0 + row_in_step; r < r1; r += rows_per_step) {
          const int64_t off = ((s * R + r) * C + c0) * K;
          for (int64_t k = 0; k < K; ++k) acc[0] += mul<Acc>(a[off + k], b[off + k]);
        }
      }
    }
    // add up the lanes that read the same channels in different rows (lane, lane ^ lpr, ...)
    for (int off = kWarpSize / 2; off >= lpr; off >>= 1) {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
    }
    if (active && row_in_step == 0) {
#pragma unroll
      for (int j = 0; j < V; ++j) part[(s * C + c0 + j) * nsplit + split] = acc[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// channel_dot, large K (NCHW activations, dim=1): the warp's lanes walk the rows x K elements of
// one (s, c) entry as a flat sequence of V-element packs; item = (s, c, split) and its partial sum
// goes to part[item] = part[(s*C + c)*nsplit + split].
// V > 1 only when K % V == 0 and both base pointers are 16-byte aligned.
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc, int V>
__global__ void __launch_bounds__(kThreads)
    channel_dot_lanes_over_k(const T* __restrict__ a, const T* __restrict__ b, int64_t S,
                             int64_t R, int64_t C, int64_t K, int64_t rows_per_split,
                             int64_t nsplit, Acc* __restrict__ part) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n_items = S * C * nsplit;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t Kv = K / V;                  // packs per run
  const int64_t step_r = kWarpSize / Kv;     // a warp step of 32 packs = step_r rows + step_k packs
  const int64_t step_k = kWarpSize % Kv;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       item < n_items; item += warp_stride) {
    const int64_t split = item % nsplit;
    const int64_t sc = item / nsplit;  // = s * C + c
    const int64_t c = sc % C;
    const int64_t s = sc / C;
    const int64_t r0 = split * rows_per_split;
    const int64_t nr = (r0 + rows_per_split < R ? r0 + rows_per_split : R) - r0;
    const T* pa = a + ((s * R + r0) * C + c) * K;
    const T* pb = b + ((s * R + r0) * C + c) * K;
    const int64_t row_stride = C * K;
    Acc acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = Acc(0);
    int64_t r = lane / Kv, kv = lane % Kv;
    while (r < nr) {
      const int64_t off = r * row_stride + kv * V;
      if constexpr (V > 1) {
        using P = Pack<T, V>;
        const P xa = *reinterpret_cast<const P*>(pa + off);
        const P xb = *reinterpret_cast<const P*>(pb + off);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += mul<Acc>(xa.v[j], xb.v[j]);
      } else {
        acc[0] += mul<Acc>(pa[off], pb[off]);
      }
      r += step_r;
      kv += step_k;
      if (kv >= Kv) {
        kv -= Kv;
        ++r;
      }
    }
    Acc total = acc[0];
#pragma unroll
    for (int j = 1; j < V; ++j) total += acc[j];
    total = warp_sum(total);  // every lane of the warp reaches this point
    if (lane == 0) part[item] = total;
  }
}

// out[i] = sum over splits of part[i * nsplit + split]; one warp per output entry.
template <typename Acc, typename Out>
__global__ void __launch_bounds__(kThreads)
    sum_splits(const Acc* __restrict__ part, int64_t n, int64_t nsplit, Out* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       i < n; i += warp_stride) {
    Acc v = Acc(0);
    for (int64_t sp = lane; sp < nsplit; sp += kWarpSize) v += part[i * nsplit + sp];
    v = warp_sum(v);  // the split order within a lane and the butterfly are fixed: deterministic
    if (lane == 0) out[i] = static_cast<Out>(v);
  }
}
// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

template <typename T>
void channel_dot_cuda_impl(const Tensor& a, const Tensor& b, const Block& blk, Tensor& out) {
  using Acc = typename AccOf<T>::type;
  using Out = OutOf<T>;
  constexpr int VV = kVec<T>;
  const Launch l = launch_context(a);
  const T* pa = static_cast<const T*>(a.const_data_ptr());
  const T* pb = static_cast<const T*>(b.const_data_ptr());
  const bool aligned = aligned16(pa) && aligned16(pb);
  const int64_t S = blk.S, R = blk.R, C = blk.C, K = blk.K;
  const ScalarType acc_dtype = std::is_same_v<Acc, double> ? ScalarType::Double : ScalarType::Float;

  int64_t rps = R, nsplit = 1;
  Tensor part;
  if (K >= 16) {
    const bool vec = aligned && K % VV == 0;
    const int64_t elems_min = static_cast<int64_t>(kWarpSize) * (vec ? VV : 1) * 4;
    rps = rows_per_split(R, S * C, target_warps(l), ceil_div(elems_min, K));
    nsplit = ceil_div(R, rps);
    part = new_output({nsplit * S * C}, acc_dtype, a);
    Acc* pp = static_cast<Acc*>(part.mutable_data_ptr());
    const unsigned int grid = grid_for_items(S * C * nsplit, kWarpsPerBlock, l);
    if (vec) {
      channel_dot_lanes_over_k<T, Acc, VV>
          <<<grid, kThreads, 0, l.stream>>>(pa, pb, S, R, C, K, rps, nsplit, pp);
    } else {
      channel_dot_lanes_over_k<T, Acc, 1>
          <<<grid, kThreads, 0, l.stream>>>(pa, pb, S, R, C, K, rps, nsplit, pp);
    }
  } else {
    const bool vec = aligned && K == 1 && C % VV == 0;
    const int64_t packs = ceil_div(C, vec ? VV : 1);  // lanes needed to cover one row
    int lpr = 1;
    while (lpr < kWarpSize && lpr < packs) lpr *= 2;
    const int64_t ntiles = ceil_div(packs, lpr);
    rps = rows_per_split(R, S * ntiles, target_warps(l), 8 * (kWarpSize / lpr));
    nsplit = ceil_div(R, rps);
    part = new_output({nsplit * S * C}, acc_dtype, a);
    Acc* pp = static_cast<Acc*>(part.mutable_data_ptr());
    const unsigned int grid = grid_for_items(S * nsplit * ntiles, kWarpsPerBlock, l);
    if (vec) {
      channel_dot_lanes_over_c<T, Acc, VV>
          <<<grid, kThreads, 0, l.stream>>>(pa, pb, S, R, C, K, rps, nsplit, ntiles, lpr, pp);
    } else {
      channel_dot_lanes_over_c<T, Acc, 1>
          <<<grid, kThreads, 0, l.stream>>>(pa, pb, S, R, C, K, rps, nsplit, ntiles, lpr, pp);
    }
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n = S * C;
  sum_splits<Acc, Out><<<grid_for_items(n, kWarpsPerBlock, l), kThreads, 0, l.stream>>>(
      static_cast<const Acc*>(part.const_data_ptr()), n, nsplit,
      static_cast<Out*>(out.mutable_data_ptr()));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor channel_dot_cuda(Tensor a, Tensor b, int64_t dim, bool per_sample) {
  dim = check_channel_dot_args(a, b, dim, per_sample);
  STD_TORCH_CHECK(a.is_cuda(), "channel_dot: CUDA kernel called with non-CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(a.get_device_index());
  const Block blk = resolve_block(a, b, dim, per_sample);
  const ScalarType odt = result_dtype(a.scalar_type());
  Tensor out = per_sample ? new_output({blk.S, blk.C}, odt, a) : new_output({blk.C}, odt, a);
  if (a.numel() == 0) {
    torch::stable::zero_(out);
    return out;
  }
  dispatch_float<float, double, half_bits, bf16_bits>(a.scalar_type(), "channel_dot",
                                                       [&](auto tag) {
    channel_dot_cuda_impl<decltype(tag)>(a, b, blk, out);
    return 0;
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CUDA, m) {
  m.impl("channel_dot", TORCH_BOX(&channel_dot_cuda));
}

}  // namespace pyobc
