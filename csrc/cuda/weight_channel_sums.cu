// CUDA kernel of weight_channel_sums: for a (grouped) weight w and a same-shape t, the sums of
// w * t per out-channel and per in-channel. Schema in csrc/ops.cpp; the vector loads, product and
// work split it shares with channel_dot are in channel_reduce.cuh (with the design notes).
//
// Stable-ABI headers only (no ATen/c10 CUDA headers): the current stream comes from
// aoti_torch_get_current_cuda_stream, the device guard from torch::stable::accelerator.
#include "channel_reduce.cuh"

#include <tuple>

namespace pyobc {
namespace {

// ---------------------------------------------------------------------------------------------
// weight_channel_sums: weights as (O, R, Ig, K), lanes over in-channels.
// item = (group g, chunk q of the group's out-channels, channel tile); per out-channel row the warp
// reduces its tile's products into ws_rows[tile * O + o]; per in-channel the lane's column sum
// over the chunk goes to ws_cols[(g * nq + q) * Ig + c].
// V > 1 only when K == 1, Ig % V == 0 and both base pointers are 16-byte aligned.
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc, int V>
__global__ void __launch_bounds__(kThreads)
    weight_sums_lanes_over_c(const T* __restrict__ w, const T* __restrict__ t, int64_t O,
                             int64_t R, int64_t Ig, int64_t K, int64_t groups,
                             int64_t rows_per_chunk, int64_t nq, int64_t ntiles,
                             Acc* __restrict__ ws_rows, Acc* __restrict__ ws_cols) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t Og = O / groups;
  const int64_t n_items = groups * nq * ntiles;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       item < n_items; item += warp_stride) {
    const int64_t tile = item % ntiles;
    const int64_t q = (item / ntiles) % nq;
    const int64_t g = item / (ntiles * nq);
    const int64_t c0 = (tile * kWarpSize + lane) * V;
    const bool active = c0 < Ig;  // inactive lanes still take part in the row reductions
    const int64_t o_begin = g * Og + q * rows_per_chunk;
    const int64_t o_end = (q + 1) * rows_per_chunk < Og ? o_begin + rows_per_chunk : (g + 1) * Og;
    Acc col[V];
#pragma unroll
    for (int j = 0; j < V; ++j) col[j] = Acc(0);
    for (int64_t o = o_begin; o < o_end; ++o) {  // warp-uniform loop
      Acc v[V];
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = Acc(0);
      if (active) {
        if constexpr (V > 1) {
          using P = Pack<T, V>;
          for (int64_t r = 0; r < R; ++r) {
            const int64_t off = (o * R + r) * Ig + c0;
            const P pw = *reinterpret_cast<const P*>(w + off);
            const P pt = *reinterpret_cast<const P*>(t + off);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] += mul<Acc>(pw.v[j], pt.v[j]);
          }
        } else {
          for (int64_t r = 0; r < R; ++r) {
            const int64_t off = ((o * R + r) * Ig + c0) * K;
            for (int64_t k = 0; k < K; ++k) v[0] += mul<Acc>(w[off + k], t[off + k]);
          }
        }
      }
      Acc row = v[0];
      col[0] += v[0];
#pragma unroll
      for (int j = 1; j < V; ++j) {
        row += v[j];
        col[j] += v[j];
      }
      row = warp_sum(row);
      if (lane == 0) ws_rows[tile * O + o] = row;
    }
    if (active) {
      Acc* dst = ws_cols + (g * nq + q) * Ig + c0;
#pragma unroll
      for (int j = 0; j < V; ++j) dst[j] = col[j];
    }
  }
}

// out_sums[o] = sum over tiles of ws_rows[tile * O + o];
// in_sums[g * Ig + c] = sum over chunks q of ws_cols[(g * nq + q) * Ig + c]
template <typename Acc, typename Out>
__global__ void __launch_bounds__(kThreads)
    weight_sums_finalize(const Acc* __restrict__ ws_rows, const Acc* __restrict__ ws_cols,
                         int64_t O, int64_t Ig, int64_t groups, int64_t nq, int64_t ntiles,
                         Out* __restrict__ out_sums, Out* __restrict__ in_sums) {
  const int64_t I = groups * Ig;
  const int64_t n = O > I ? O : I;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < O) {
      Acc v = Acc(0);
      for (int64_t tile = 0; tile < ntiles; ++tile) v += ws_rows[tile * O + i];
      out_sums[i] = static_cast<Out>(v);
    }
    if (i < I) {
      const int64_t g = i / Ig, c = i % Ig;
      Acc v = Acc(0);
      for (int64_t q = 0; q < nq; ++q) v += ws_cols[(g * nq + q) * Ig + c];
      in_sums[i] = static_cast<Out>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

template <typename T>
void weight_sums_cuda_impl(const Tensor& w, const Tensor& t, const Block& blk, int64_t groups,
                           Tensor& out_sums, Tensor& in_sums) {
  using Acc = typename AccOf<T>::type;
  using Out = OutOf<T>;
  constexpr int VV = kVec<T>;
  const Launch l = launch_context(w);
  const T* pw = static_cast<const T*>(w.const_data_ptr());
  const T* pt = static_cast<const T*>(t.const_data_ptr());
  const int64_t O = blk.S, R = blk.R, Ig = blk.C, K = blk.K;
  const int64_t Og = O / groups;
  const bool vec = aligned16(pw) && aligned16(pt) && K == 1 && Ig % VV == 0;
  const int64_t width = static_cast<int64_t>(kWarpSize) * (vec ? VV : 1);
  const int64_t ntiles = ceil_div(Ig, width);
  const int64_t rpc = rows_per_split(Og, groups * ntiles, target_warps(l), 8);
  const int64_t nq = ceil_div(Og, rpc);
  const ScalarType acc_dtype = std::is_same_v<Acc, double> ? ScalarType::Double : ScalarType::Float;
  Tensor ws = new_output({ntiles * O + groups * nq * Ig}, acc_dtype, w);
  Acc* ws_rows = static_cast<Acc*>(ws.mutable_data_ptr());
  Acc* ws_cols = ws_rows + ntiles * O;
  const unsigned int grid = grid_for_items(groups * nq * ntiles, kWarpsPerBlock, l);
  if (vec) {
    weight_sums_lanes_over_c<T, Acc, VV><<<grid, kThreads, 0, l.stream>>>(
        pw, pt, O, R, Ig, K, groups, rpc, nq, ntiles, ws_rows, ws_cols);
  } else {
    weight_sums_lanes_over_c<T, Acc, 1><<<grid, kThreads, 0, l.stream>>>(
        pw, pt, O, R, Ig, K, groups, rpc, nq, ntiles, ws_rows, ws_cols);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  weight_sums_finalize<Acc, Out>
      <<<grid_for_items(std::max(O, groups * Ig), kThreads, l), kThreads, 0, l.stream>>>(
          ws_rows, ws_cols, O, Ig, groups, nq, ntiles,
          static_cast<Out*>(out_sums.mutable_data_ptr()),
          static_cast<Out*>(in_sums.mutable_data_ptr()));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> weight_channel_sums_cuda(Tensor w, Tensor t, int64_t groups) {
  check_weight_sums_args(w, t, groups);
  STD_TORCH_CHECK(w.is_cuda(), "weight_channel_sums: CUDA kernel called with non-CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(w.get_device_index());
  const Block blk = resolve_block(w, t, 1, /*keep_lead=*/true);
  const ScalarType odt = result_dtype(w.scalar_type());
  Tensor out_sums = new_output({blk.S}, odt, w);
  Tensor in_sums = new_output({groups * blk.C}, odt, w);
  if (w.numel() == 0) {
    torch::stable::zero_(out_sums);
    torch::stable::zero_(in_sums);
    return {out_sums, in_sums};
  }
  dispatch_float<float, double, half_bits, bf16_bits>(w.scalar_type(), "weight_channel_sums",
                                                       [&](auto tag) {
    weight_sums_cuda_impl<decltype(tag)>(w, t, blk, groups, out_sums, in_sums);
    return 0;
  });
  return {out_sums, in_sums};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CUDA, m) {
  m.impl("weight_channel_sums", TORCH_BOX(&weight_channel_sums_cuda));
}

}  // namespace pyobc
