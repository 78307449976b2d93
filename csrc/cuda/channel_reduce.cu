// CUDA kernels of the channel reductions: channel_dot and weight_channel_sums.
//
// Stable-ABI headers only (no ATen/c10 CUDA headers): the current stream comes from
// aoti_torch_get_current_cuda_stream, the device guard from torch::stable::accelerator.
//
// Inputs are read as the dense (S, R, C, K) block of csrc/common.h. Each work item belongs to one
// warp (8 warps per block, grid-stride over items; about 48 items per SM) and writes its partial
// sums to a workspace, one writer per entry; a second small kernel adds the partials in a fixed
// order and converts to the output dtype. So results are deterministic (no atomics), and the
// workspace holds one value per (item, output entry): far smaller than the input (an item
// reduces at least 8 rows, or at least 4 loads per lane) and bounded by items x output size.
// Accumulation: float64 for float32/float64 input, float32 for float16/bfloat16.
// Loads are 16-byte vectors when the sizes and base addresses allow it.
#include "cuda_common.cuh"

namespace pyobc {
namespace {

using namespace pyobc::cuda;

template <typename T> struct Traits {  // float32
  using acc = double;
  using out = float;
};
template <> struct Traits<double> {
  using acc = double;
  using out = double;
};
template <> struct Traits<half_bits> {
  using acc = float;
  using out = float;
};
template <> struct Traits<bf16_bits> {
  using acc = float;
  using out = float;
};

// V consecutive elements loaded as one 16-byte (or narrower) transaction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename Acc, typename T>
__device__ __forceinline__ Acc mul(T a, T b) {
  return static_cast<Acc>(widen(a)) * static_cast<Acc>(widen(b));
}


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

// Splits n rows into chunks of at least min_rows so that base_items * chunks ~ target.
inline int64_t rows_per_split(int64_t n, int64_t base_items, int64_t target, int64_t min_rows) {
  const int64_t wanted = std::max<int64_t>(1, ceil_div(target, std::max<int64_t>(base_items, 1)));
  return std::max<int64_t>(std::max<int64_t>(min_rows, 1), ceil_div(n, wanted));
}

template <typename T>
void channel_dot_cuda_impl(const Tensor& a, const Tensor& b, const Block& blk, Tensor& out) {
  using Acc = typename Traits<T>::acc;
  using Out = typename Traits<T>::out;
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

template <typename T>
void weight_sums_cuda_impl(const Tensor& w, const Tensor& t, const Block& blk, int64_t groups,
                           Tensor& out_sums, Tensor& in_sums) {
  using Acc = typename Traits<T>::acc;
  using Out = typename Traits<T>::out;
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
  m.impl("channel_dot", TORCH_BOX(&channel_dot_cuda));
  m.impl("weight_channel_sums", TORCH_BOX(&weight_channel_sums_cuda));
}

}  // namespace pyobc
