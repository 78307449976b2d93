// C++ test of the pyobc operators: calls them through torch's dispatcher with the stable C API
// (torch_call_dispatcher, as any C++ user of the ops would) on small tensors and compares with
// naive loops. Exits non-zero on any mismatch. Built and run by CMakeLists.txt (ctest).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <vector>

using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace detail = torch::stable::detail;

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

Tensor make(const std::vector<int64_t>& shape, ScalarType dtype, uint64_t seed,
            MemoryFormat format = MemoryFormat::Contiguous) {
  Tensor t = torch::stable::empty(shape, dtype, torch::headeronly::Layout::Strided,
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  std::nullopt, format);
  uint64_t state = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t i = 0; i < t.numel(); ++i) {  // dense: storage holds exactly numel elements
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const double v = static_cast<double>((state >> 33) % 2001) / 1000.0 - 1.0;  // [-1, 1]
    if (dtype == ScalarType::Double) {
      static_cast<double*>(t.mutable_data_ptr())[i] = v;
    } else {
      static_cast<float*>(t.mutable_data_ptr())[i] = static_cast<float>(v);
    }
  }
  return t;
}

double at(const Tensor& t, const std::vector<int64_t>& idx) {
  int64_t off = 0;
  for (size_t d = 0; d < idx.size(); ++d) off += idx[d] * t.stride(static_cast<int64_t>(d));
  if (t.scalar_type() == ScalarType::Double) return static_cast<const double*>(t.const_data_ptr())[off];
  return static_cast<const float*>(t.const_data_ptr())[off];
}

// Calls every index of `shape` in row-major order.
template <typename F>
void for_each_index(const std::vector<int64_t>& shape, F&& f) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  std::vector<int64_t> idx(shape.size(), 0);
  for (int64_t n = 0; n < numel; ++n) {
    f(idx);
    for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

std::vector<int64_t> shape_of(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < t.dim(); ++d) s.push_back(t.size(d));
  return s;
}

bool close(const Tensor& got, const std::vector<double>& want, double rtol) {
  if (got.numel() != static_cast<int64_t>(want.size())) return false;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got.scalar_type() == ScalarType::Double
                         ? static_cast<const double*>(got.const_data_ptr())[i]
                         : static_cast<const float*>(got.const_data_ptr())[i];
    if (!(std::fabs(g - want[i]) <= rtol * (1.0 + std::fabs(want[i])))) return false;
  }
  return true;
}

bool call_channel_dot(const Tensor& a, const Tensor& b, int64_t dim, bool per_sample, Tensor* out) {
  StableIValue stack[4] = {detail::from(a), detail::from(b), detail::from(dim),
                           detail::from(per_sample)};
  if (torch_call_dispatcher("pyobc::channel_dot", "", stack, TORCH_ABI_VERSION) != TORCH_SUCCESS)
    return false;
  *out = detail::to<Tensor>(stack[0]);
  return true;
}

bool call_weight_sums(const Tensor& w, const Tensor& t, int64_t groups, Tensor* outs,
                      Tensor* ins) {
  StableIValue stack[3] = {detail::from(w), detail::from(t), detail::from(groups)};
  if (torch_call_dispatcher("pyobc::weight_channel_sums", "", stack, TORCH_ABI_VERSION) !=
      TORCH_SUCCESS)
    return false;
  *outs = detail::to<Tensor>(stack[0]);
  *ins = detail::to<Tensor>(stack[1]);
  return true;
}

void test_channel_dot(const std::vector<int64_t>& shape, int64_t dim, bool per_sample,
                      ScalarType dtype, MemoryFormat format = MemoryFormat::Contiguous) {
  const Tensor a = make(shape, dtype, 1, format), b = make(shape, dtype, 2, format);
  const int64_t nd = static_cast<int64_t>(shape.size());
  const int64_t d = dim < 0 ? dim + nd : dim;
  const int64_t C = shape[d], S = per_sample ? shape[0] : 1;
  std::vector<double> want(static_cast<size_t>(S * C), 0.0);
  for_each_index(shape, [&](const std::vector<int64_t>& idx) {
    want[(per_sample ? idx[0] * C : 0) + idx[d]] += at(a, idx) * at(b, idx);
  });
  std::string what = "channel_dot shape=(";
  for (int64_t s : shape) what += std::to_string(s) + ",";
  what += ") dim=" + std::to_string(dim) + (per_sample ? " per_sample" : "") +
          (dtype == ScalarType::Double ? " f64" : " f32") +
          (format == MemoryFormat::ChannelsLast ? " channels_last" : "");
  Tensor out;
  const bool ok = call_channel_dot(a, b, dim, per_sample, &out);
  const double rtol = dtype == ScalarType::Double ? 1e-12 : 1e-6;
  check(ok && out.scalar_type() == (dtype == ScalarType::Double ? dtype : ScalarType::Float) &&
            close(out, want, rtol),
        what);
}

bool call_channel_scale(const Tensor& x, const Tensor& s, int64_t dim, bool per_sample, Tensor* out) {
  StableIValue stack[4] = {detail::from(x), detail::from(s), detail::from(dim),
                           detail::from(per_sample)};
  if (torch_call_dispatcher("pyobc::channel_scale", "", stack, TORCH_ABI_VERSION) != TORCH_SUCCESS)
    return false;
  *out = detail::to<Tensor>(stack[0]);
  return true;
}

// out = x * s broadcast along dim (and dim 0 with per_sample): exact in float32/float64
void test_channel_scale(const std::vector<int64_t>& shape, int64_t dim, bool per_sample,
                        ScalarType dtype, MemoryFormat format = MemoryFormat::Contiguous) {
  const Tensor x = make(shape, dtype, 8, format);
  const int64_t nd = static_cast<int64_t>(shape.size());
  const int64_t d = dim < 0 ? dim + nd : dim;
  const Tensor s = per_sample ? make({shape[0], shape[d]}, dtype, 9) : make({shape[d]}, dtype, 9);
  Tensor out;
  bool ok = call_channel_scale(x, s, dim, per_sample, &out) && out.scalar_type() == dtype &&
            shape_of(out) == shape;
  if (ok) {
    for_each_index(shape, [&](const std::vector<int64_t>& idx) {
      const double sv = per_sample ? at(s, {idx[0], idx[d]}) : at(s, {idx[d]});
      const double want = dtype == ScalarType::Double ? at(x, idx) * sv
                                                      : static_cast<float>(static_cast<float>(at(x, idx)) *
                                                                           static_cast<float>(sv));
      if (at(out, idx) != want) ok = false;
    });
  }
  std::string what = "channel_scale shape=(";
  for (int64_t v : shape) what += std::to_string(v) + ",";
  what += ") dim=" + std::to_string(dim) + (per_sample ? " per_sample" : "") +
          (format == MemoryFormat::ChannelsLast ? " channels_last" : "");
  check(ok, what);
}

void test_weight_sums(const std::vector<int64_t>& shape, int64_t groups, ScalarType dtype) {
  const Tensor w = make(shape, dtype, 3), t = make(shape, dtype, 4);
  const int64_t O = shape[0], Ig = shape[1], Og = O / groups;
  std::vector<double> want_out(static_cast<size_t>(O), 0.0);
  std::vector<double> want_in(static_cast<size_t>(groups * Ig), 0.0);
  for_each_index(shape, [&](const std::vector<int64_t>& idx) {
    const double p = at(w, idx) * at(t, idx);
    want_out[idx[0]] += p;
    want_in[(idx[0] / Og) * Ig + idx[1]] += p;
  });
  Tensor outs, ins;
  const bool ok = call_weight_sums(w, t, groups, &outs, &ins);
  const double rtol = dtype == ScalarType::Double ? 1e-12 : 1e-6;
  std::string what = "weight_channel_sums shape=(";
  for (int64_t s : shape) what += std::to_string(s) + ",";
  what += ") groups=" + std::to_string(groups) + (dtype == ScalarType::Double ? " f64" : " f32");
  check(ok && close(outs, want_out, rtol) && close(ins, want_in, rtol), what);
}

bool call_csr_sum(const Tensor& v, const Tensor& rowptr, const Tensor& col,
                  std::optional<Tensor> w, Tensor* out) {
  StableIValue stack[4] = {detail::from(v), detail::from(rowptr), detail::from(col),
                           detail::from(w)};
  if (torch_call_dispatcher("pyobc::csr_gather_sum", "", stack, TORCH_ABI_VERSION) !=
      TORCH_SUCCESS)
    return false;
  *out = detail::to<Tensor>(stack[0]);
  return true;
}

bool call_csr_reduce(const Tensor& v, const Tensor& rowptr, const Tensor& col,
                     const std::string& reduce, Tensor* out) {
  StableIValue stack[4] = {detail::from(v), detail::from(rowptr), detail::from(col),
                           detail::from(reduce)};
  if (torch_call_dispatcher("pyobc::csr_gather_reduce", "", stack, TORCH_ABI_VERSION) !=
      TORCH_SUCCESS)
    return false;
  *out = detail::to<Tensor>(stack[0]);
  return true;
}

bool call_gather(const std::vector<Tensor>& ts, const std::vector<int64_t>& dims,
                 const std::vector<Tensor>& idx, std::vector<Tensor>* outs) {
  StableIValue stack[3] = {detail::from(ts), detail::from(dims), detail::from(idx)};
  if (torch_call_dispatcher("pyobc::gather_channels", "", stack, TORCH_ABI_VERSION) !=
      TORCH_SUCCESS)
    return false;
  *outs = detail::to<std::vector<Tensor>>(stack[0]);
  return true;
}

Tensor longs(const std::vector<int64_t>& v) {
  Tensor t = torch::stable::empty({static_cast<int64_t>(v.size())}, ScalarType::Long,
                                  torch::headeronly::Layout::Strided,
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU));
  for (size_t i = 0; i < v.size(); ++i) static_cast<int64_t*>(t.mutable_data_ptr())[i] = v[i];
  return t;
}

// out[r, i] = reduce over k in [rowptr[i], rowptr[i+1]) of w[k] * v[r, col[k]], by loops
void test_csr(const std::vector<int64_t>& vshape, ScalarType dtype, bool weighted) {
  const std::vector<int64_t> rp = {0, 2, 2, 5, 6}, cl = {4, 0, 1, 1, 3, 2};
  const Tensor v = make(vshape, dtype, 11), rowptr = longs(rp), col = longs(cl);
  const Tensor w = make({6}, dtype, 12);
  const int64_t R = vshape.size() == 2 ? vshape[0] : 1, N = 4;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> sum(R * N, 0.0), amax(R * N, -inf), cnt(R * N, 0.0), mean(R * N, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t k = rp[i]; k < rp[i + 1]; ++k) {
        const double x = vshape.size() == 2 ? at(v, {r, cl[k]}) : at(v, {cl[k]});
        sum[r * N + i] += (weighted ? at(w, {k}) : 1.0) * x;
        amax[r * N + i] = std::max(amax[r * N + i], x);
        cnt[r * N + i] += x != 0.0;
        mean[r * N + i] += x;
      }
      mean[r * N + i] /= std::max(cnt[r * N + i], 1.0);
    }
  }
  const double rtol = dtype == ScalarType::Double ? 1e-12 : 1e-6;
  const std::string what = std::string(vshape.size() == 2 ? " 2-d" : " 1-d") +
                           (dtype == ScalarType::Double ? " f64" : " f32");
  Tensor out;
  bool ok = call_csr_sum(v, rowptr, col, weighted ? std::optional<Tensor>(w) : std::nullopt, &out);
  check(ok && out.scalar_type() == dtype && close(out, sum, rtol),
        std::string("csr_gather_sum") + (weighted ? " weighted" : "") + what);
  if (weighted) return;
  ok = call_csr_reduce(v, rowptr, col, "amax", &out);
  bool amax_ok = ok && out.numel() == R * N;
  for (int64_t o = 0; amax_ok && o < R * N; ++o) {
    const double g = dtype == ScalarType::Double ? static_cast<const double*>(out.const_data_ptr())[o]
                                                 : static_cast<const float*>(out.const_data_ptr())[o];
    amax_ok = g == amax[o];  // exact, -inf for the empty row
  }
  check(amax_ok, "csr_gather_reduce amax" + what);
  ok = call_csr_reduce(v, rowptr, col, "count_nonzero", &out);
  check(ok && close(out, cnt, 0.0), "csr_gather_reduce count_nonzero" + what);
  ok = call_csr_reduce(v, rowptr, col, "mean_nonzero", &out);
  check(ok && close(out, mean, rtol), "csr_gather_reduce mean_nonzero" + what);
}

void test_gather() {
  const ScalarType f32 = ScalarType::Float, f64 = ScalarType::Double;
  const Tensor a = make({4, 3, 5}, f32, 13), b = make({6}, f64, 14);
  const Tensor c = make({2, 8, 3, 3}, f32, 15, MemoryFormat::ChannelsLast);
  const std::vector<int64_t> ia = {2, 0, 2}, ib = {5, 1}, ic = {7, 0, 3};
  std::vector<Tensor> outs;
  const bool ok = call_gather({a, b, c}, {1, -1, 1}, {longs(ia), longs(ib), longs(ic)}, &outs);
  bool same = ok && outs.size() == 3;
  if (same) {
    for_each_index({4, 3, 5}, [&](const std::vector<int64_t>& idx) {
      same &= at(outs[0], idx) == at(a, {idx[0], ia[idx[1]], idx[2]});
    });
    for (int64_t j = 0; j < 2; ++j) same &= at(outs[1], {j}) == at(b, {ib[j]});
    for_each_index({2, 3, 3, 3}, [&](const std::vector<int64_t>& idx) {
      same &= at(outs[2], {idx[0], idx[1], idx[2], idx[3]}) ==
              at(c, {idx[0], ic[idx[1]], idx[2], idx[3]});
    });
    same &= outs[0].is_contiguous() && outs[2].is_contiguous();
  }
  check(same, "gather_channels: 3 tensors (f32 dim 1, f64 dim -1, channels_last dim 1)");
}

}  // namespace

int main() {
  const ScalarType f32 = ScalarType::Float, f64 = ScalarType::Double;
  test_channel_dot({3, 4, 5}, 1, false, f32);
  test_channel_dot({3, 4, 5}, 1, true, f32);
  test_channel_dot({4, 7, 6}, -1, false, f64);
  test_channel_dot({4, 7, 6}, -1, true, f64);
  test_channel_dot({5, 6}, 0, false, f32);
  test_channel_dot({2, 8, 3, 5}, 1, false, f64, MemoryFormat::ChannelsLast);
  test_channel_dot({2, 8, 3, 5}, 1, true, f32, MemoryFormat::ChannelsLast);
  test_channel_dot({2, 8, 3, 5}, 2, true, f64, MemoryFormat::ChannelsLast);
  test_channel_dot({64, 16, 20}, 1, false, f32);  // larger than one task: exercises parallel_for
  test_channel_dot({3, 0, 4}, 2, true, f32);      // empty input -> zeros
  test_channel_scale({3, 4, 5}, 1, false, f32);
  test_channel_scale({3, 4, 5}, -1, true, f64);
  test_channel_scale({2, 8, 3, 5}, 1, true, f32, MemoryFormat::ChannelsLast);
  test_channel_scale({64, 16, 20}, 1, false, f64);  // several tasks
  test_weight_sums({6, 2, 3, 3}, 3, f32);
  test_weight_sums({6, 4, 3, 3}, 1, f64);
  test_weight_sums({5, 7}, 1, f32);
  test_weight_sums({4, 1, 3, 3}, 4, f64);  // depthwise
  test_csr({5}, f32, false);
  test_csr({3, 5}, f64, false);
  test_csr({3, 5}, f32, true);
  test_csr({5}, f64, true);
  test_gather();

  // invalid calls must fail with an error code, not crash
  {
    Tensor out;
    const Tensor a = make({3, 4}, f32, 5), b = make({3, 5}, f32, 6);
    check(!call_channel_dot(a, b, 1, false, &out), "channel_dot rejects mismatched shapes");
    check(!call_channel_dot(a, a, 2, false, &out), "channel_dot rejects dim out of range");
    check(!call_channel_dot(a, a, 0, true, &out), "channel_dot rejects per_sample with dim=0");
    check(!call_channel_scale(a, make({3}, f32, 7), 1, false, &out),
          "channel_scale rejects a scale of the wrong length");
    Tensor outs, ins;
    const Tensor w = make({6, 2, 3}, f32, 7);
    check(!call_weight_sums(w, w, 4, &outs, &ins), "weight_channel_sums rejects groups=4 for O=6");
    const Tensor v = make({2, 5}, f32, 8);
    check(!call_csr_sum(v, longs({0, 2, 3}), longs({0, 5, 1}), std::nullopt, &out),
          "csr_gather_sum rejects a column out of range");
    check(!call_csr_sum(v, longs({0, 3, 2}), longs({0, 1, 1}), std::nullopt, &out),
          "csr_gather_sum rejects a decreasing rowptr");
    check(!call_csr_reduce(v, longs({0, 1}), longs({0}), "max", &out),
          "csr_gather_reduce rejects an unknown reduction");
    std::vector<Tensor> gouts;
    check(!call_gather({v}, {1}, {longs({5})}, &gouts), "gather_channels rejects index 5 of 5");
    check(!call_gather({v}, {2}, {longs({0})}, &gouts), "gather_channels rejects dim 2 of a 2-d tensor");
    check(!call_gather({v, v}, {0}, {longs({0})}, &gouts),
          "gather_channels rejects lists of different lengths");
  }

  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
