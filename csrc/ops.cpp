// Operator schemas of the pyobc namespace: the one place they are written in C++.
// pyobc/ops/_registry.py holds the same strings for the pure-PyTorch fallback; tests/test_ops.py
// checks that both agree. Adding an op: one m.def line here, one kernel file per backend named
// after the op (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu, each with its own STABLE_TORCH_LIBRARY_IMPL
// block; code two ops share goes into a header of that directory), and an entry in
// pyobc/ops/_registry.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(pyobc, m) {
  m.def("channel_dot(Tensor a, Tensor b, int dim, bool per_sample=False) -> Tensor");
  m.def("weight_channel_sums(Tensor w, Tensor t, int groups=1) -> (Tensor, Tensor)");
  m.def("csr_gather_sum(Tensor values, Tensor rowptr, Tensor col, Tensor? weight=None) -> Tensor");
  m.def("csr_gather_reduce(Tensor values, Tensor rowptr, Tensor col, str reduce) -> Tensor");
  m.def("gather_channels(Tensor[] tensors, int[] dims, Tensor[] indices) -> Tensor[]");
  m.def("channel_scale(Tensor x, Tensor scale, int dim, bool per_sample=False) -> Tensor");
  m.def("conv2d_sq_grad_sums(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, int[] dilation) -> Tensor");
}
