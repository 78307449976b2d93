// CPU kernel of csr_gather_reduce: out[r, i] = amax / count_nonzero / mean_nonzero over k in
// [rowptr[i], rowptr[i+1]) of values[r, col[k]]. Schema in csrc/ops.cpp; the kernels (shared with
// csr_gather_sum) and the entry csr_cpu are in csr_reduce.h. The op is boxed by hand
// (csr_gather_reduce_boxed, csrc/common.h) to read its `str reduce` argument without a leak.
#include "csr_reduce.h"

namespace pyobc {

STABLE_TORCH_LIBRARY_IMPL(pyobc, CPU, m) {
  m.impl("csr_gather_reduce", &csr_gather_reduce_boxed<&csr_cpu</*SumOp=*/false>>);
}

}  // namespace pyobc
