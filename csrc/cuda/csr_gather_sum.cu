// CUDA kernel of csr_gather_sum: out[r, i] = sum over k in [rowptr[i], rowptr[i+1]) of
// (weight[k] *) values[r, col[k]]. Schema in csrc/ops.cpp; the kernels (shared with
// csr_gather_reduce) and the entry csr_cuda are in csr_reduce.cuh.
#include "csr_reduce.cuh"

namespace pyobc {
namespace {

Tensor csr_gather_sum_cuda(Tensor values, Tensor rowptr, Tensor col, std::optional<Tensor> weight) {
  return csr_cuda</*SumOp=*/true>(values, rowptr, col, weight, CsrReduce::Sum, "csr_gather_sum");
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyobc, CUDA, m) {
  m.impl("csr_gather_sum", TORCH_BOX(&csr_gather_sum_cuda));
}

}  // namespace pyobc
