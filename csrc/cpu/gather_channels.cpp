// CPU kernel of gather_channels: slices many tensors along one dim each (index_select of a list).
// Schema in csrc/ops.cpp.
//
// Every (tensor, dim, index) triple becomes a strided (outer, D, inner) block (csrc/common.h,
// GatherView); the output rows (outer x len(index)) of all tensors are cut into tasks of about
// 64 KiB and copied in ONE parallel region. Elements are moved as opaque 1/2/4/8/16 byte units, so
// every fixed-size dtype works. Inputs that are not such a block (rare: e.g. a channels_last weight
// sliced on dim 0) are copied to a contiguous tensor first.
#include "../common.h"
#include "index_check.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pyobc {
namespace {

constexpr int64_t kGrainBytes = 64 * 1024;  // bytes per gather_channels task

struct Job {
  const char* src;
  char* dst;
  const int64_t* idx;
  int64_t nidx;
  int64_t esize;
  GatherView v;
};

struct Task {
  int64_t job, row_begin, row_end;
};

struct E16 {
  uint64_t lo, hi;
};

// n <= 64 bytes with at most four (overlapping) 16-byte moves: no loop, no libc call.
inline void copy_short(char* __restrict d, const char* __restrict s, int64_t n) {
  if (n >= 16) {
    std::memcpy(d, s, 16);
    if (n > 32) {
      std::memcpy(d + 16, s + 16, 16);
      std::memcpy(d + n - 32, s + n - 32, 16);
    }
    std::memcpy(d + n - 16, s + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(d, s, 8);
    std::memcpy(d + n - 8, s + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(d, s, 4);
    std::memcpy(d + n - 4, s + n - 4, 4);
  } else {
    for (int64_t b = 0; b < n; ++b) d[b] = s[b];
  }
}

// Output rows [r0, r1) of a job; a row is `inner` elements of E. (Everything is read into locals
// first: stores through the byte-typed destination could alias the Job's fields otherwise, and
// the compiler would reload them after every element.)
template <typename E>
void copy_rows(const Job& jb, int64_t r0, int64_t r1) {
  constexpr int64_t es = sizeof(E);
  const char* __restrict src = jb.src;
  const int64_t* __restrict idx = jb.idx;
  const int64_t inner = jb.v.inner, nidx = jb.nidx;
  const int64_t s_outer = jb.v.s_outer * es, s_dim = jb.v.s_dim * es;
  const int64_t step = (jb.v.s_inner == 1 || inner == 1 ? 1 : jb.v.s_inner) * es;
  const int64_t row_bytes = inner * es;
  const bool long_rows = step == es && row_bytes > 64;  // else a libc call costs more than the copy
  char* __restrict dst = jb.dst + r0 * row_bytes;
  int64_t o = r0 / nidx, j = r0 % nidx;
  for (int64_t r = r0; r < r1; ++r) {
    const char* s = src + o * s_outer + idx[j] * s_dim;
    if (long_rows) {
      std::memcpy(dst, s, static_cast<size_t>(row_bytes));
    } else if (step == es) {
      copy_short(dst, s, row_bytes);
    } else {
      for (int64_t n = 0; n < inner; ++n) std::memcpy(dst + n * es, s + n * step, es);
    }
    dst += row_bytes;
    if (++j == nidx) {
      j = 0;
      ++o;
    }
  }
}

void run_task(const Job& jb, int64_t r0, int64_t r1) {
  switch (jb.esize) {
    case 1: copy_rows<uint8_t>(jb, r0, r1); break;
    case 2: copy_rows<uint16_t>(jb, r0, r1); break;
    case 4: copy_rows<uint32_t>(jb, r0, r1); break;
    case 8: copy_rows<uint64_t>(jb, r0, r1); break;
    case 16: copy_rows<E16>(jb, r0, r1); break;
    default: break;  // rejected before
  }
}

std::vector<Tensor> gather_channels_cpu(std::vector<Tensor> tensors, std::vector<int64_t> dims,
                                        std::vector<Tensor> indices) {
  const std::vector<int64_t> dim = check_gather_args(tensors, dims, indices);
  const size_t n = tensors.size();
  std::vector<Tensor> outs, keep;
  outs.reserve(n);
  keep.reserve(2 * n);
  std::vector<Job> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    Tensor t = tensors[i];
    STD_TORCH_CHECK(t.is_cpu(), "gather_channels: CPU kernel called with non-CPU tensors[", i, "]");
    const int64_t d = dim[i];
    Tensor idx = as_contiguous(indices[i]);
    keep.push_back(idx);
    const int64_t nidx = idx.numel(), size = t.size(d);
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    if (any_outside(ip, nidx, size)) {
      const auto mm = std::minmax_element(ip, ip + nidx);
      STD_TORCH_CHECK(false, "gather_channels: indices[", i, "] has entries outside [0, ", size,
                      ") (the size of dim ", d, " of tensors[", i, "]): min ", *mm.first,
                      ", max ", *mm.second);
    }
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[d] = nidx;
    Tensor out = new_output(shape, t.scalar_type(), t);
    outs.push_back(out);
    Job& jb = jobs[i];
    if (!gather_view(t, d, &jb.v)) {
      t = torch::stable::contiguous(t);
      const bool ok = gather_view(t, d, &jb.v);
      STD_TORCH_CHECK(ok, "gather_channels: internal error, contiguous tensor not recognised");
    }
    keep.push_back(t);
    jb.esize = static_cast<int64_t>(t.element_size());
    STD_TORCH_CHECK(jb.esize == 1 || jb.esize == 2 || jb.esize == 4 || jb.esize == 8 ||
                        jb.esize == 16,
                    "gather_channels: unsupported element size ", jb.esize);
    jb.src = static_cast<const char*>(t.const_data_ptr());
    jb.dst = static_cast<char*>(out.mutable_data_ptr());
    jb.idx = ip;
    jb.nidx = nidx;
  }
  // cut every job's rows into tasks of about kGrainBytes
  std::vector<Task> tasks;
  int64_t total_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const Job& jb = jobs[i];
    const int64_t rows = jb.v.outer * jb.nidx;
    const int64_t row_bytes = jb.v.inner * jb.esize;
    if (rows == 0 || row_bytes == 0) continue;
    total_bytes += rows * row_bytes;
    const int64_t per_task = std::max<int64_t>(1, kGrainBytes / row_bytes);
    for (int64_t r = 0; r < rows; r += per_task)
      tasks.push_back({static_cast<int64_t>(i), r, std::min(rows, r + per_task)});
  }
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  if (ntasks == 0) return outs;
  // up to 1 MiB in all, the copy runs inline (grain = all tasks): a memory-bound copy gains
  // little from more cores, and waiting for pool threads on a busy machine costs milliseconds;
  // beyond, tasks of ~64 KiB run in parallel
  const int64_t grain = total_bytes < 16 * kGrainBytes ? ntasks : 1;
  torch::stable::parallel_for(0, ntasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task& tk = tasks[t];
      run_task(jobs[tk.job], tk.row_begin, tk.row_end);
    }
  });
  return outs;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CPU, m) {
  m.impl("gather_channels", TORCH_BOX(&gather_channels_cpu));
}

}  // namespace pyobc
