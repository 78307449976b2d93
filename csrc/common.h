// Shared host-side helpers for the pyobc kernels (CPU and CUDA translation units).
//
// Stable-ABI headers only (compiled with -DTORCH_TARGET_VERSION=0x020a000000000000, so one binary
// works with every torch >= 2.10). Nothing in here includes ATen, c10 or Python.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace pyobc {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---------------------------------------------------------------------------------------------
// dtype rules shared by every channel-reduction op
// ---------------------------------------------------------------------------------------------

inline bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    default: return torch::headeronly::toString(t);
  }
}

// float64 in -> float64 out; every other supported dtype -> float32 out.
inline ScalarType result_dtype(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// Calls fn(tag) with tag = CpuTag<scalar_t> for the four supported dtypes. The concrete C++ element
// types are chosen by the caller (the CPU and CUDA files use different half/bfloat16 types).
template <typename F32, typename F64, typename F16, typename BF16, typename Fn>
decltype(auto) dispatch_float(ScalarType t, const char* op, Fn&& fn) {
  switch (t) {
    case ScalarType::Float: return fn(F32{});
    case ScalarType::Double: return fn(F64{});
    case ScalarType::Half: return fn(F16{});
    case ScalarType::BFloat16: return fn(BF16{});
    default:
      STD_TORCH_CHECK(false, op, ": unsupported dtype ", dtype_name(t));
  }
  return fn(F32{});  // unreachable
}

// ---------------------------------------------------------------------------------------------
// Argument checks (mirrors pyobc/ops/_meta.py; these guard direct torch.ops.pyobc.* calls)
// ---------------------------------------------------------------------------------------------

inline void check_pair(const Tensor& a, const Tensor& b, const char* op, const char* na,
                       const char* nb) {
  STD_TORCH_CHECK(a.layout() == torch::headeronly::Layout::Strided &&
                      b.layout() == torch::headeronly::Layout::Strided,
                  op, ": ", na, " and ", nb, " must be strided (dense) tensors");
  const ScalarType ta = a.scalar_type();
  STD_TORCH_CHECK(is_supported_float(ta), op, ": ", na,
                  " must be float32, float64, float16 or bfloat16, got ", dtype_name(ta));
  STD_TORCH_CHECK(b.scalar_type() == ta, op, ": ", na, " and ", nb,
                  " must have the same dtype, got ", dtype_name(ta), " and ",
                  dtype_name(b.scalar_type()));
  STD_TORCH_CHECK(a.device() == b.device(), op, ": ", na, " and ", nb,
                  " must be on the same device");
  STD_TORCH_CHECK(a.dim() == b.dim() && a.sizes().equals(b.sizes()), op, ": ", na, " and ", nb,
                  " must have the same shape");
}

// ---------------------------------------------------------------------------------------------
// Memory layout
//
// Every op here reduces products a*b to a small (S, C) table. The kernels read the inputs as a
// contiguous block of shape (S, R, C, K):  element (s, r, c, k) lives at ((s*R + r)*C + c)*K + k.
//   S: kept leading dim (the batch for per_sample, the out-channel for weights; 1 otherwise)
//   R: rows per S (every reduced dim laid out outside the channel dim)
//   C: channels (the kept dim)
//   K: inner size (every reduced dim laid out inside the channel dim)
// A standard-contiguous tensor, a channels_last / channels_last_3d tensor and any permuted dense
// tensor (e.g. a transpose of a contiguous tensor) map onto this block without a copy, as long
// as a and b share strides and (when a leading dim is kept) that dim is outermost in memory.
// Anything else is copied to a contiguous tensor first.
// ---------------------------------------------------------------------------------------------

struct Block {
  int64_t S = 1, R = 1, C = 1, K = 1;
};

// Tries to describe t as a dense (S, R, C, K) block in place; returns false when it is not dense
// and non-overlapping, or when keep_lead is set and dim 0 is not outermost in memory.
inline bool dense_block(const Tensor& t, int64_t dim, bool keep_lead, Block* out) {
  const int64_t nd = t.dim();
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t numel = 1;
  for (int64_t i = 0; i < nd; ++i) numel *= sizes[i];
  Block blk;
  blk.C = sizes[dim];
  blk.S = keep_lead ? sizes[0] : 1;
  if (numel == 0) {
    // nothing is read; only S and C matter for the output shape
    *out = blk;
    return true;
  }
  // dims of size > 1 sorted by decreasing stride must form a contiguous tensor
  int64_t order[64];
  int64_t n = 0;
  for (int64_t i = 0; i < nd; ++i)
    if (sizes[i] > 1) order[n++] = i;
  std::sort(order, order + n, [&](int64_t x, int64_t y) { return strides[x] > strides[y]; });
  int64_t expected = 1;
  for (int64_t j = n - 1; j >= 0; --j) {
    if (strides[order[j]] != expected) return false;
    expected *= sizes[order[j]];
  }
  if (keep_lead && sizes[0] > 1 && order[0] != 0) return false;  // lead dim not outermost
  if (blk.C > 1) {
    blk.K = strides[dim];  // dense: the stride of the channel dim is the inner size
  }
  // (with a single channel, K = 1 and every element is a row: each S slice is one contiguous run)
  blk.R = numel / (blk.S * blk.C * blk.K);
  *out = blk;
  return true;
}

inline bool same_strides(const Tensor& a, const Tensor& b) {
  const auto sa = a.strides(), sb = b.strides(), sz = a.sizes();
  for (int64_t i = 0; i < a.dim(); ++i)
    if (sz[i] > 1 && sa[i] != sb[i]) return false;
  return true;
}

// Resolves the (S, R, C, K) block for a pair of same-shape tensors, replacing them with contiguous
// copies when they cannot be read in place.
inline Block resolve_block(Tensor& a, Tensor& b, int64_t dim, bool keep_lead) {
  Block blk;
  if (same_strides(a, b) && dense_block(a, dim, keep_lead, &blk)) return blk;
  a = torch::stable::contiguous(a);
  b = torch::stable::contiguous(b);
  const bool ok = dense_block(a, dim, keep_lead, &blk);
  STD_TORCH_CHECK(ok, "pyobc: internal error, contiguous tensor not recognised as dense");
  return blk;
}

// Normalises and checks the arguments of channel_dot; returns the normalised dim.
inline int64_t check_channel_dot_args(const Tensor& a, const Tensor& b, int64_t dim,
                                      bool per_sample) {
  check_pair(a, b, "channel_dot", "a", "b");
  const int64_t nd = a.dim();
  STD_TORCH_CHECK(nd >= 1, "channel_dot: a must have at least 1 dimension");
  STD_TORCH_CHECK(nd <= 64, "channel_dot: at most 64 dimensions are supported");
  STD_TORCH_CHECK(dim >= -nd && dim < nd, "channel_dot: dim=", dim, " is out of range for a ", nd,
                  "-d tensor");
  if (dim < 0) dim += nd;
  if (per_sample) {
    STD_TORCH_CHECK(nd >= 2, "channel_dot: per_sample=True needs at least 2 dims (batch, channel)");
    STD_TORCH_CHECK(dim != 0,
                    "channel_dot: per_sample=True keeps dim 0 (the batch), so dim must not be 0");
  }
  return dim;
}

// Checks the arguments of weight_channel_sums.
inline void check_weight_sums_args(const Tensor& w, const Tensor& t, int64_t groups) {
  check_pair(w, t, "weight_channel_sums", "w", "t");
  STD_TORCH_CHECK(w.dim() >= 2, "weight_channel_sums: w must have at least 2 dims (O, I/groups, ...)");
  STD_TORCH_CHECK(w.dim() <= 64, "weight_channel_sums: at most 64 dimensions are supported");
  STD_TORCH_CHECK(groups >= 1, "weight_channel_sums: groups must be >= 1, got ", groups);
  STD_TORCH_CHECK(w.size(0) % groups == 0, "weight_channel_sums: groups=", groups,
                  " does not divide the out-channel count ", w.size(0));
}

inline Tensor new_output(std::initializer_list<int64_t> shape, ScalarType dtype,
                         const Tensor& like) {
  std::vector<int64_t> s(shape);
  return torch::stable::empty(s, dtype, torch::headeronly::Layout::Strided, like.device());
}

}  // namespace pyobc
