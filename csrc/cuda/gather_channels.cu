// CUDA kernel of gather_channels: slices many tensors along one dim each (index_select of a
// list). Schema in csrc/ops.cpp.
//
// Stable-ABI headers only (no ATen/c10 CUDA headers): the current stream comes from
// aoti_torch_get_current_cuda_stream, the device guard from torch::stable::accelerator.
//
// One launch for all tensors. Each (tensor, dim, index) triple is a descriptor of a strided
// (outer, D, inner) block; the descriptors and a per-descriptor block offset table travel to the
// device in one pinned host-to-device copy. Each CUDA block copies a chunk of one descriptor's
// output (found by binary search on the block table). Elements move as opaque units of 1-16 bytes,
// widened on the host to 16/8/4-byte units when sizes, strides and addresses allow. Out-of-range
// indices never cause a read: the thread writes zeros and sets a per-descriptor flag, which the
// host reads back (one small device-to-host copy) to raise a clear error.
#include "cuda_common.cuh"

#include <cstring>
#include <vector>

namespace pyobc {
namespace {

using namespace pyobc::cuda;

// Unsigned division by a constant d >= 1 for n < 2^31: q = (umulhi(n, m) + n) >> s.
struct FastDiv {
  uint32_t d, m, s;
};

inline FastDiv make_fast_div(uint32_t d) {
  uint32_t s = 0;
  while (s < 32 && (uint64_t{1} << s) < d) ++s;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1;
  return {d, static_cast<uint32_t>(m), s};
}

__device__ __forceinline__ uint32_t fast_div(uint32_t n, const FastDiv& f) {
  return (__umulhi(n, f.m) + n) >> f.s;
}

// One tensor's gather, in units of `unit` bytes; all sizes and strides in units.
struct Desc {
  const char* src;
  char* dst;
  const int64_t* idx;
  int64_t nidx, size, outer, inner, s_outer, s_dim, s_inner, numel, unit;
  FastDiv div_inner, div_nidx;
  int32_t small;  // numel < 2^31: FastDiv usable
};

static_assert(sizeof(Desc) % 8 == 0, "Desc must be a whole number of int64 words");

constexpr int64_t kChunk = 4096;  // output units per CUDA block

struct alignas(16) U16 {  // 16-byte units at 16-byte aligned addresses: one vector load/store
  uint64_t lo, hi;
};
struct U16u {  // 16-byte elements whose addresses are only 8-byte aligned (never seen in practice)
  uint64_t lo, hi;
};
constexpr int64_t kUnaligned16 = -16;

template <typename E>
__device__ void copy_chunk(const Desc& g, int64_t e0, int64_t e1, int64_t* flag) {
  const E* src = reinterpret_cast<const E*>(g.src);
  E* dst = reinterpret_cast<E*>(g.dst);
  for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    int64_t n, j, o;
    if (g.small) {
      const uint32_t ue = static_cast<uint32_t>(e);
      const uint32_t rest = fast_div(ue, g.div_inner);
      n = ue - rest * g.div_inner.d;
      o = fast_div(rest, g.div_nidx);
      j = rest - static_cast<uint32_t>(o) * g.div_nidx.d;
    } else {
      const int64_t rest = e / g.inner;
      n = e - rest * g.inner;
      o = rest / g.nidx;
      j = rest - o * g.nidx;
    }
    const int64_t ix = g.idx[j];
    if (ix < 0 || ix >= g.size) {
      *flag = 1;  // idempotent store: no ordering needed
      dst[e] = E{};
      continue;
    }
    dst[e] = src[o * g.s_outer + ix * g.s_dim + n * g.s_inner];
  }
}

__global__ void __launch_bounds__(kThreads)
    gather_kernel(const Desc* __restrict__ descs, const int64_t* __restrict__ block_begin,
                  int64_t ndesc, int64_t* __restrict__ flags) {
  const int64_t b = blockIdx.x;
  int64_t lo = 0, hi = ndesc - 1;  // the last descriptor whose first block is <= b
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (block_begin[mid] <= b) lo = mid; else hi = mid - 1;
  }
  const Desc& g = descs[lo];
  const int64_t e0 = (b - block_begin[lo]) * kChunk;
  const int64_t e1 = e0 + kChunk < g.numel ? e0 + kChunk : g.numel;
  switch (g.unit) {  // uniform per block
    case 1: copy_chunk<uint8_t>(g, e0, e1, flags + lo); break;
    case 2: copy_chunk<uint16_t>(g, e0, e1, flags + lo); break;
    case 4: copy_chunk<uint32_t>(g, e0, e1, flags + lo); break;
    case 8: copy_chunk<uint64_t>(g, e0, e1, flags + lo); break;
    case 16: copy_chunk<U16>(g, e0, e1, flags + lo); break;
    default: copy_chunk<U16u>(g, e0, e1, flags + lo); break;  // kUnaligned16
  }
}

// Re-expresses a job in the widest unit (<= 16 bytes) that divides every byte size, stride and
// address involved, so contiguous runs are copied with vector loads. (Addresses are always
// aligned to the element size for the native dtypes; 16-byte elements are checked anyway.)
void widen_unit(Desc* g, int64_t esize) {
  auto bytes_ok = [&](int64_t unit) {
    if (unit % esize != 0 || unit <= esize) return false;
    const int64_t f = unit / esize;
    if (!(g->s_inner == 1 || g->inner == 1)) return false;
    if (g->inner % f != 0) return false;
    if (g->outer > 1 && g->s_outer % f != 0) return false;
    if (g->s_dim % f != 0) return false;
    return reinterpret_cast<uintptr_t>(g->src) % unit == 0 &&
           reinterpret_cast<uintptr_t>(g->dst) % unit == 0;
  };
  int64_t unit = esize;
  for (int64_t u : {16, 8, 4, 2}) {
    if (bytes_ok(u)) {
      unit = u;
      break;
    }
  }
  const int64_t f = unit / esize;
  if (f > 1) {
    g->inner /= f;
    g->s_inner = 1;
    g->s_outer /= f;
    g->s_dim /= f;
  }
  g->unit = unit;
  if (unit == 16 && !(reinterpret_cast<uintptr_t>(g->src) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(g->dst) % 16 == 0))
    g->unit = kUnaligned16;
}

std::vector<Tensor> gather_channels_cuda(std::vector<Tensor> tensors, std::vector<int64_t> dims,
                                         std::vector<Tensor> indices) {
  const std::vector<int64_t> dim = check_gather_args(tensors, dims, indices);
  const size_t n = tensors.size();
  std::vector<Tensor> outs;
  if (n == 0) return outs;
  const Tensor& first = tensors[0];
  STD_TORCH_CHECK(first.is_cuda(), "gather_channels: CUDA kernel called with non-CUDA tensors[0]");
  torch::stable::accelerator::DeviceGuard guard(first.get_device_index());
  outs.reserve(n);
  std::vector<Tensor> keep;
  keep.reserve(2 * n);
  std::vector<Desc> descs(n);
  std::vector<int64_t> block_begin(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    Tensor t = tensors[i];
    STD_TORCH_CHECK(t.device() == first.device(), "gather_channels: all tensors must be on one "
                    "device (tensors[", i, "] is not on the device of tensors[0])");
    const int64_t d = dim[i];
    Tensor idx = as_contiguous(indices[i]);
    keep.push_back(idx);
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[d] = idx.numel();
    Tensor out = new_output(shape, t.scalar_type(), t);
    outs.push_back(out);
    GatherView v;
    if (!gather_view(t, d, &v)) {
      t = torch::stable::contiguous(t);
      const bool ok = gather_view(t, d, &v);
      STD_TORCH_CHECK(ok, "gather_channels: internal error, contiguous tensor not recognised");
    }
    keep.push_back(t);
    const int64_t esize = static_cast<int64_t>(t.element_size());
    STD_TORCH_CHECK(esize == 1 || esize == 2 || esize == 4 || esize == 8 || esize == 16,
                    "gather_channels: unsupported element size ", esize);
    Desc& g = descs[i];
    g.src = static_cast<const char*>(t.const_data_ptr());
    g.dst = static_cast<char*>(out.mutable_data_ptr());
    g.idx = idx.const_data_ptr<int64_t>();
    g.nidx = idx.numel();
    g.size = v.size;
    g.outer = v.outer;
    g.inner = v.inner;
    g.s_outer = v.s_outer;
    g.s_dim = v.s_dim;
    g.s_inner = v.s_inner;
    widen_unit(&g, esize);
    g.numel = g.outer * g.nidx * g.inner;
    g.small = g.numel < (int64_t{1} << 31);
    g.div_inner = make_fast_div(static_cast<uint32_t>(g.small && g.inner > 0 ? g.inner : 1));
    g.div_nidx = make_fast_div(static_cast<uint32_t>(g.small && g.nidx > 0 ? g.nidx : 1));
    block_begin[i + 1] = block_begin[i] + ceil_div(g.numel, kChunk);
  }
  const int64_t blocks = block_begin[n];
  if (blocks == 0) return outs;
  STD_TORCH_CHECK(blocks < (int64_t{1} << 31), "gather_channels: output too large for one launch");

  // one buffer: descriptors | block table | per-descriptor error flags (int64 words)
  const int64_t desc_words = ceil_div(static_cast<int64_t>(sizeof(Desc)), 8);
  const int64_t words = static_cast<int64_t>(n) * desc_words + static_cast<int64_t>(n) + 1 +
                        static_cast<int64_t>(n);
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  Tensor host = torch::stable::empty({words}, ScalarType::Long, torch::headeronly::Layout::Strided,
                                     cpu, /*pin_memory=*/true);
  int64_t* hp = host.mutable_data_ptr<int64_t>();
  std::memset(hp, 0, static_cast<size_t>(words) * 8);
  std::memcpy(hp, descs.data(), n * sizeof(Desc));  // sizeof(Desc) <= desc_words * 8
  int64_t* hb = hp + n * desc_words;
  for (size_t i = 0; i <= n; ++i) hb[i] = block_begin[i];
  // (a non-blocking copy from pinned memory: torch keeps the host block alive until it is done)
  Tensor dev = torch::stable::to(host, first.device(), /*non_blocking=*/true);
  int64_t* dp = dev.mutable_data_ptr<int64_t>();
  const Launch l = launch_context(first);
  gather_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, l.stream>>>(
      reinterpret_cast<const Desc*>(dp), dp + n * desc_words, static_cast<int64_t>(n),
      dp + n * desc_words + n + 1);
  STD_CUDA_KERNEL_LAUNCH_CHECK();

  // read the flags back (synchronises with the stream) and report the first bad index tensor
  const Tensor flags = torch::stable::to(
      torch::stable::narrow(dev, 0, static_cast<int64_t>(n) * desc_words +
                                                             static_cast<int64_t>(n) + 1,
                            static_cast<int64_t>(n)),
      cpu);
  const int64_t* fp = flags.const_data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) {
    STD_TORCH_CHECK(fp[i] == 0, "gather_channels: indices[", i, "] has entries outside [0, ",
                    tensors[i].size(dim[i]), ") (the size of dim ", dim[i], " of tensors[", i,
                    "])");
  }
  return outs;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CUDA, m) {
  m.impl("gather_channels", TORCH_BOX(&gather_channels_cuda));
}

}  // namespace pyobc
