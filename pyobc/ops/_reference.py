"""Pure-PyTorch reference implementations of the pyobc operators.

They serve every device when the compiled library is absent (and CUDA when the library was built
without CUDA kernels), and they are the tests' second opinion. They follow the compiled kernels'
output dtypes (float64 for float64 input, float32 otherwise), accumulate in float64 for
float32/float64 input and float32 for float16/bfloat16 (at least as precise as the compiled
kernels), and, unlike them, create full-size temporaries.
"""
from __future__ import annotations

import math

import torch

from ._meta import (accumulate_dtype, check_channel_dot, check_weight_channel_sums,
                    result_dtype)


def channel_dot(a: torch.Tensor, b: torch.Tensor, dim: int, per_sample: bool = False):
    dim = check_channel_dot(a, b, dim, per_sample)
    acc = accumulate_dtype(a.dtype)
    prod = a.to(acc) * b.to(acc)
    keep = {dim, 0} if per_sample else {dim}
    reduce_dims = [i for i in range(a.dim()) if i not in keep]
    # (sum over an empty dim list would reduce everything)
    out = prod.sum(reduce_dims) if reduce_dims else prod
    return out.to(result_dtype(a.dtype)).contiguous()


def weight_channel_sums(w: torch.Tensor, t: torch.Tensor, groups: int = 1):
    groups = check_weight_channel_sums(w, t, groups)
    acc = accumulate_dtype(w.dtype)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    inner = math.prod(w.shape[2:])
    per_pair = (w.to(acc) * t.to(acc)).reshape(out_ch, in_per_group, inner).sum(2)  # (O, I/groups)
    out_sums = per_pair.sum(1)
    in_sums = per_pair.reshape(groups, out_ch // groups, in_per_group).sum(1)
    dtype = result_dtype(w.dtype)
    return out_sums.to(dtype).contiguous(), in_sums.reshape(-1).to(dtype).contiguous()
