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
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// CPU leaves compiled twice on x86-64 Linux with GCC, for the baseline ISA and for x86-64-v3
// (AVX2+FMA), picked at load time (ifunc): one portable wheel still uses the wide vector units.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(__CUDACC__)
#define PYOBC_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYOBC_MULTIVERSION
#endif

// Forces inlining of the small helpers the leaves call (cvt, the dot products), so that they are
// compiled into each multiversioned leaf (an out-of-line helper is built for the baseline ISA only).
#define PYOBC_INLINE inline __attribute__((always_inline))

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
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Short: return "int16";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Bool: return "bool";
    default: return torch::headeronly::toString(t);
  }
}

// float64 in -> float64 out; every other supported dtype -> float32 out.
inline ScalarType result_dtype(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// The C++ type of result_dtype: double for float64 input, float for the other three.
template <typename T>
using OutOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Accumulation type of the reductions: float64 for float32/float64 input, float32 for float16 and
// bfloat16. The 16-bit floats are recognised by their size, so one rule serves both element types
// they come in (torch::headeronly::Half / BFloat16 on CPU, the raw half_bits / bf16_bits on CUDA).
template <typename T>
struct AccOf {
  using type = std::conditional_t<sizeof(T) == 2, float, double>;
};

// Host-side conversions between an element type and an accumulation type: the 16-bit floats
// (class types, on CPU) go through float, float/double convert directly. (The CUDA kernels use
// their device variants widen / narrow_to of cuda/cuda_common.cuh.)
template <typename Acc, typename T>
PYOBC_INLINE Acc cvt(T x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<Acc>(x);
  } else {
    return static_cast<Acc>(static_cast<float>(x));
  }
}

template <typename T, typename Acc>
inline T narrow(Acc x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(x);
  } else {
    return T(static_cast<float>(x));
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CPU kernels: work (in elements) below which a task is not worth splitting further.
constexpr int64_t kGrain = 32768;

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

// Normalises and checks the arguments of channel_scale; returns the normalised dim.
inline int64_t check_channel_scale_args(const Tensor& x, const Tensor& scale, int64_t dim,
                                        bool per_sample) {
  STD_TORCH_CHECK(x.layout() == torch::headeronly::Layout::Strided &&
                      scale.layout() == torch::headeronly::Layout::Strided,
                  "channel_scale: x and scale must be strided (dense) tensors");
  const ScalarType t = x.scalar_type();
  STD_TORCH_CHECK(is_supported_float(t),
                  "channel_scale: x must be float32, float64, float16 or bfloat16, got ", dtype_name(t));
  STD_TORCH_CHECK(scale.scalar_type() == t, "channel_scale: x and scale must have the same dtype, got ",
                  dtype_name(t), " and ", dtype_name(scale.scalar_type()));
  STD_TORCH_CHECK(x.device() == scale.device(), "channel_scale: x and scale must be on the same device");
  const int64_t nd = x.dim();
  STD_TORCH_CHECK(nd >= 1 && nd <= 64, "channel_scale: x must have 1 to 64 dimensions");
  STD_TORCH_CHECK(dim >= -nd && dim < nd, "channel_scale: dim=", dim, " is out of range for a ", nd,
                  "-d tensor");
  if (dim < 0) dim += nd;
  if (per_sample) {
    STD_TORCH_CHECK(nd >= 2 && dim != 0,
                    "channel_scale: per_sample=True needs a batch dim 0 and a channel dim other than 0");
    STD_TORCH_CHECK(scale.dim() == 2 && scale.size(0) == x.size(0) && scale.size(1) == x.size(dim),
                    "channel_scale: with per_sample=True scale must have shape (x.shape[0], x.shape[dim])");
  } else {
    STD_TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(dim),
                    "channel_scale: scale must have shape (x.shape[dim],)");
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

// ---------------------------------------------------------------------------------------------
// conv2d_sq_grad_sums (mirrors check_conv2d_sq_grad_sums in pyobc/ops/_checks.py)
// ---------------------------------------------------------------------------------------------

// Shape of a 2-D convolution (groups 1): input (N, C, H, W), weight (Co, C, kh, kw), output
// gradient (N, Co, Ho, Wo); L = Ho * Wo output positions, K = C * kh * kw weights per out-channel.
struct Conv2dGeom {
  int64_t N, C, H, W, Co, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t L() const { return Ho * Wo; }
  int64_t K() const { return C * kh * kw; }
};

inline Conv2dGeom check_conv2d_sq_args(const Tensor& x, const Tensor& g, const std::vector<int64_t>& k,
                                       const std::vector<int64_t>& s, const std::vector<int64_t>& p,
                                       const std::vector<int64_t>& d) {
  const char* op = "conv2d_sq_grad_sums";
  STD_TORCH_CHECK(x.layout() == torch::headeronly::Layout::Strided &&
                      g.layout() == torch::headeronly::Layout::Strided,
                  op, ": x and g must be strided (dense) tensors");
  const ScalarType t = x.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::Float || t == ScalarType::Double, op,
                  ": x must be float32 or float64, got ", dtype_name(t));
  STD_TORCH_CHECK(g.scalar_type() == t, op, ": x and g must have the same dtype, got ", dtype_name(t),
                  " and ", dtype_name(g.scalar_type()));
  STD_TORCH_CHECK(x.device() == g.device(), op, ": x and g must be on the same device");
  STD_TORCH_CHECK(x.dim() == 4 && g.dim() == 4, op, ": x and g must be 4-d (N, C, H, W) tensors");
  STD_TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2 && d.size() == 2, op,
                  ": kernel_size, stride, padding and dilation must have two entries each");
  for (int i = 0; i < 2; ++i) {
    STD_TORCH_CHECK(k[i] >= 1 && s[i] >= 1 && d[i] >= 1 && p[i] >= 0, op,
                    ": kernel_size, stride and dilation must be >= 1 and padding >= 0");
  }
  Conv2dGeom geo{x.size(0), x.size(1), x.size(2), x.size(3), g.size(1), g.size(2), g.size(3),
                 k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1]};
  const int64_t ho = (geo.H + 2 * geo.ph - geo.dh * (geo.kh - 1) - 1) / geo.sh + 1;
  const int64_t wo = (geo.W + 2 * geo.pw - geo.dw * (geo.kw - 1) - 1) / geo.sw + 1;
  STD_TORCH_CHECK(g.size(0) == geo.N && geo.Ho == ho && geo.Wo == wo, op, ": g must have shape (",
                  geo.N, ", Co, ", ho, ", ", wo, ") for this x and convolution, got (", g.size(0), ", ",
                  g.size(1), ", ", g.size(2), ", ", g.size(3), ")");
  return geo;
}

// t itself when contiguous (no dispatcher call), else a contiguous copy.
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

inline Tensor new_output(std::initializer_list<int64_t> shape, ScalarType dtype,
                         const Tensor& like) {
  std::vector<int64_t> s(shape);
  return torch::stable::empty(s, dtype, torch::headeronly::Layout::Strided, like.device());
}

// ---------------------------------------------------------------------------------------------
// Index ops: csr_gather_sum / csr_gather_reduce and gather_channels (mirrors pyobc/ops/_meta.py)
// ---------------------------------------------------------------------------------------------

// Reads a `str` argument from a boxed stack slot and frees its handle. (The stable ABI's own
// std::string unboxing in torch 2.10-2.13 leaks the string it builds, once per call.)
inline std::string take_string(StableIValue v) {
  StringHandle handle = torch::stable::detail::to<StringHandle>(v);
  size_t length = 0;
  const char* data = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(torch_string_length(handle, &length));
  STABLE_TORCH_ERROR_CODE_CHECK(torch_string_c_str(handle, &data));
  std::string s(data, length);
  STABLE_TORCH_ERROR_CODE_CHECK(torch_delete_string(handle));
  return s;
}

// Reductions of csr_gather_reduce; the numbering is internal (the schema takes a string).
enum class CsrReduce : int { Sum = 0, Amax = 1, CountNonzero = 2, MeanNonzero = 3 };

inline CsrReduce parse_csr_reduce(const std::string& s) {
  if (s == "amax") return CsrReduce::Amax;
  if (s == "count_nonzero") return CsrReduce::CountNonzero;
  if (s == "mean_nonzero") return CsrReduce::MeanNonzero;
  STD_TORCH_CHECK(false, "csr_gather_reduce: reduce must be 'amax', 'count_nonzero' or "
                  "'mean_nonzero', got '", s, "' (use csr_gather_sum for sums)");
  return CsrReduce::Sum;
}

// Shape facts of a CSR call that both devices' kernels need (arguments already checked):
// values (S,) or (R, S) with strides sr (rows) and ss (sources), N outputs per row.
struct CsrShape {
  bool batched;
  int64_t R, S, sr, ss, N;
};

inline CsrShape csr_shape(const Tensor& values, const Tensor& rowptr) {
  const bool batched = values.dim() == 2;
  return {batched, batched ? values.size(0) : 1, values.size(values.dim() - 1),
          batched ? values.stride(0) : 0, values.stride(values.dim() - 1), rowptr.numel() - 1};
}

// The output of a CSR call: (N,) or (R, N), values' dtype and device.
inline Tensor csr_output(const Tensor& values, const CsrShape& s) {
  return s.batched ? new_output({s.R, s.N}, values.scalar_type(), values)
                   : new_output({s.N}, values.scalar_type(), values);
}

// Turns the run-time reduction (and whether a weight is given: sums only) into compile-time
// arguments, once for both devices: f(std::integral_constant<CsrReduce, M>, std::bool_constant<W>).
template <typename F>
void with_csr_mode(CsrReduce mode, bool weighted, F&& f) {
  using Sum = std::integral_constant<CsrReduce, CsrReduce::Sum>;
  switch (mode) {
    case CsrReduce::Sum:
      if (weighted) {
        f(Sum{}, std::true_type{});
      } else {
        f(Sum{}, std::false_type{});
      }
      break;
    case CsrReduce::Amax:
      f(std::integral_constant<CsrReduce, CsrReduce::Amax>{}, std::false_type{});
      break;
    case CsrReduce::CountNonzero:
      f(std::integral_constant<CsrReduce, CsrReduce::CountNonzero>{}, std::false_type{});
      break;
    case CsrReduce::MeanNonzero:
      f(std::integral_constant<CsrReduce, CsrReduce::MeanNonzero>{}, std::false_type{});
      break;
  }
}

// The CSR entries of each device (csr_cpu in cpu/csr_reduce.h, csr_cuda in cuda/csr_reduce.cuh)
// have this signature; csr_gather_sum and csr_gather_reduce are thin entries over them.
using CsrImpl = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                           CsrReduce, const char*);

// csr_gather_reduce boxed by hand, once for both devices: the stable ABI's std::string unboxing
// (torch <= 2.13) never frees the string it makes, so the `str reduce` argument is read from its
// handle here and the handle deleted (take_string).
template <CsrImpl Impl>
void csr_gather_reduce_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  STD_TORCH_CHECK(num_args == 4 && num_outputs == 1,
                  "csr_gather_reduce: schema mismatch (expected 4 args, 1 output)");
  namespace d = torch::stable::detail;
  Tensor values = d::to<Tensor>(stack[0]);
  Tensor rowptr = d::to<Tensor>(stack[1]);
  Tensor col = d::to<Tensor>(stack[2]);
  const std::string reduce = take_string(stack[3]);
  stack[0] = d::from(Impl(values, rowptr, col, std::nullopt, parse_csr_reduce(reduce), "csr_gather_reduce"));
}

// Metadata checks of the CSR ops (no data is read): values (S,) or (R, S) float; rowptr (N+1,)
// and col (nnz,) int64 vectors; weight (nnz,) with values' dtype; everything on one device.
inline void check_csr_args(const Tensor& values, const Tensor& rowptr, const Tensor& col,
                           const std::optional<Tensor>& weight, const char* op) {
  const auto strided = torch::headeronly::Layout::Strided;
  STD_TORCH_CHECK(values.layout() == strided && rowptr.layout() == strided &&
                      col.layout() == strided,
                  op, ": values, rowptr and col must be strided (dense) tensors");
  const ScalarType t = values.scalar_type();
  STD_TORCH_CHECK(is_supported_float(t), op,
                  ": values must be float32, float64, float16 or bfloat16, got ", dtype_name(t));
  STD_TORCH_CHECK(values.dim() == 1 || values.dim() == 2, op,
                  ": values must be 1-d (S,) or 2-d (R, S), got ", values.dim(), " dims");
  STD_TORCH_CHECK(rowptr.scalar_type() == ScalarType::Long, op, ": rowptr must be int64, got ",
                  dtype_name(rowptr.scalar_type()));
  STD_TORCH_CHECK(col.scalar_type() == ScalarType::Long, op, ": col must be int64, got ",
                  dtype_name(col.scalar_type()));
  STD_TORCH_CHECK(rowptr.dim() == 1 && rowptr.numel() >= 1, op,
                  ": rowptr must be a 1-d tensor of N+1 >= 1 offsets");
  STD_TORCH_CHECK(col.dim() == 1, op, ": col must be a 1-d tensor, got ", col.dim(), " dims");
  STD_TORCH_CHECK(rowptr.device() == values.device() && col.device() == values.device(), op,
                  ": values, rowptr and col must be on the same device");
  if (weight.has_value()) {
    const Tensor& w = *weight;
    STD_TORCH_CHECK(w.layout() == strided, op, ": weight must be a strided (dense) tensor");
    STD_TORCH_CHECK(w.scalar_type() == t, op, ": weight must have the dtype of values (",
                    dtype_name(t), "), got ", dtype_name(w.scalar_type()));
    STD_TORCH_CHECK(w.dim() == 1 && w.numel() == col.numel(), op,
                    ": weight must be a 1-d tensor with one entry per col entry (", col.numel(),
                    ")");
    STD_TORCH_CHECK(w.device() == values.device(), op,
                    ": weight must be on the device of values");
  }
}

// dtypes gather_channels copies (byte-wise, so any fixed-size element type); quantized and
// sub-byte/bit types are refused.
inline bool is_gatherable(ScalarType t) {
  switch (t) {
    case ScalarType::Byte: case ScalarType::Char: case ScalarType::Short: case ScalarType::Int:
    case ScalarType::Long: case ScalarType::Half: case ScalarType::Float: case ScalarType::Double:
    case ScalarType::ComplexHalf: case ScalarType::ComplexFloat: case ScalarType::ComplexDouble:
    case ScalarType::Bool: case ScalarType::BFloat16: case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn: case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz: case ScalarType::UInt16: case ScalarType::UInt32:
    case ScalarType::UInt64: case ScalarType::Float8_e8m0fnu:
      return true;
    default:
      return false;
  }
}

// One gather_channels entry seen as a strided (outer, D, inner) block: every dim before `dim`
// must merge into one strided dim, and every dim after it too (true for contiguous tensors, any
// slice/transpose of a 2-d tensor, and most views). Sizes of merged groups of no dims are 1.
struct GatherView {
  int64_t outer = 1, size = 1, inner = 1;          // sizes
  int64_t s_outer = 0, s_dim = 0, s_inner = 0;     // strides, in elements
};

// Merges dims [b, e) into one (size, stride); false if they do not form one strided dim.
// (A range holding a size-0 dim is empty: nothing is read, any stride does.)
inline bool merge_dims(const int64_t* sizes, const int64_t* strides, int64_t b, int64_t e,
                       int64_t* size, int64_t* stride) {
  for (int64_t d = b; d < e; ++d) {
    if (sizes[d] == 0) {
      *size = 0;
      *stride = 0;
      return true;
    }
  }
  int64_t sz = 1, st = 0;
  bool started = false;
  for (int64_t d = e - 1; d >= b; --d) {  // innermost first
    const int64_t n = sizes[d];
    if (n == 1) continue;
    if (!started) {
      sz = n;
      st = strides[d];
      started = true;
    } else if (strides[d] == st * sz) {
      sz *= n;
    } else {
      return false;
    }
  }
  *size = sz;
  *stride = st;
  return true;
}

inline bool gather_view(const Tensor& t, int64_t dim, GatherView* v) {
  const auto sz = t.sizes();
  const auto st = t.strides();
  const int64_t nd = static_cast<int64_t>(sz.size());
  v->size = sz[dim];
  v->s_dim = st[dim];
  int64_t numel = 1;
  for (int64_t d = 0; d < nd; ++d) numel *= sz[d];
  if (numel == 0) {  // nothing is read: only the output's (outer, inner) sizes matter
    v->outer = v->inner = 1;
    for (int64_t d = 0; d < dim; ++d) v->outer *= sz[d];
    for (int64_t d = dim + 1; d < nd; ++d) v->inner *= sz[d];
    v->s_outer = v->s_inner = 0;
    return true;
  }
  return merge_dims(sz.data(), st.data(), 0, dim, &v->outer, &v->s_outer) &&
         merge_dims(sz.data(), st.data(), dim + 1, nd, &v->inner, &v->s_inner);
}

// Metadata checks of gather_channels (index values are checked by the kernels); returns the
// normalised dims.
inline std::vector<int64_t> check_gather_args(const std::vector<Tensor>& tensors,
                                              const std::vector<int64_t>& dims,
                                              const std::vector<Tensor>& indices) {
  STD_TORCH_CHECK(tensors.size() == dims.size() && tensors.size() == indices.size(),
                  "gather_channels: got ", tensors.size(), " tensors, ", dims.size(),
                  " dims and ", indices.size(), " index tensors; the three lists must have the "
                  "same length");
  std::vector<int64_t> out(dims.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    const Tensor& idx = indices[i];
    STD_TORCH_CHECK(t.layout() == torch::headeronly::Layout::Strided, "gather_channels: tensors[",
                    i, "] must be a strided (dense) tensor");
    STD_TORCH_CHECK(is_gatherable(t.scalar_type()), "gather_channels: tensors[", i,
                    "] has unsupported dtype ", dtype_name(t.scalar_type()));
    const int64_t nd = t.dim();
    STD_TORCH_CHECK(nd >= 1, "gather_channels: tensors[", i, "] must have at least 1 dim");
    STD_TORCH_CHECK(nd <= 64, "gather_channels: at most 64 dims are supported");
    int64_t d = dims[i];
    STD_TORCH_CHECK(d >= -nd && d < nd, "gather_channels: dims[", i, "]=", d,
                    " is out of range for a ", nd, "-d tensor");
    if (d < 0) d += nd;
    out[i] = d;
    STD_TORCH_CHECK(idx.layout() == torch::headeronly::Layout::Strided &&
                        idx.scalar_type() == ScalarType::Long && idx.dim() == 1,
                    "gather_channels: indices[", i, "] must be a 1-d int64 tensor");
    STD_TORCH_CHECK(idx.device() == t.device(), "gather_channels: indices[", i,
                    "] must be on the device of tensors[", i, "]");
  }
  return out;
}

// Row-major strides of `shape` (a zero-size dim counts as 1, as torch's contiguous strides do).
inline std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t st = 1;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    strides[d] = st;
    st *= std::max<int64_t>(shape[d], 1);
  }
  return strides;
}

// A contiguous tensor of `shape` over memory the caller owns and keeps alive (no copy), with the
// device and dtype of `like`.
inline Tensor contiguous_blob(void* data, const std::vector<int64_t>& shape, const Tensor& like) {
  return torch::stable::from_blob(data, shape, contiguous_strides(shape), like.device(), like.scalar_type());
}

// out = op(a, b) for a matrix product with an out= overload ("aten::mm", "aten::bmm"), through the
// dispatcher (BLAS / cuBLAS), writing into out's memory.
inline void matmul_into(const char* op, const Tensor& a, const Tensor& b, const Tensor& out) {
  namespace sd = torch::stable::detail;
  std::array<StableIValue, 3> stack{sd::from(a), sd::from(b), sd::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, "out", stack.data(), TORCH_ABI_VERSION));
}

// A new contiguous tensor on the device of `like`, allocated through the stable C shim directly
// (aoti_torch_empty_strided: no boxed dispatcher call, which matters when an op makes hundreds of
// outputs).
inline Tensor new_output(const std::vector<int64_t>& shape, ScalarType dtype,
                         const Tensor& like) {
  const int64_t nd = static_cast<int64_t>(shape.size());
  const std::vector<int64_t> strides = contiguous_strides(shape);
  namespace sd = torch::stable::detail;
  const auto device = like.device();
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      nd, shape.data(), strides.data(), sd::to<int32_t>(sd::from(dtype)),
      sd::to<int32_t>(sd::from(device.type())), device.index(), &handle));
  return Tensor(handle);
}

}  // namespace pyobc
