"""Fake (meta) kernels of the pyobc operators: output shapes and dtypes only.

Registered with ``torch.library.register_fake`` (see :mod:`._registry`) so that ``torch.compile`` and
FakeTensor tracing can trace through the ops. Each validates its arguments with the same checks as
the real kernels (:mod:`._checks`), so tracing rejects what running would reject.
"""
from __future__ import annotations

import torch


from ._checks import (check_channel_dot, check_channel_scale, check_conv2d_sq_grad_sums, check_csr, check_csr_reduce, check_gather_channels,
                      check_weight_channel_sums, result_dtype)


def channel_dot_fake(a, b, dim, per_sample=False):
    dim = check_channel_dot(a, b, dim, per_sample)
    shape = (a.shape[0], a.shape[dim]) if per_sample else (a.shape[dim],)
    return a.new_empty(shape, dtype=result_dtype(a.dtype))


def weight_channel_sums_fake(w, t, groups=1):
    groups = check_weight_channel_sums(w, t, groups)
    dtype = result_dtype(w.dtype)
    return (w.new_empty((w.shape[0],), dtype=dtype),
            w.new_empty((groups * w.shape[1],), dtype=dtype))


def csr_gather_sum_fake(values, rowptr, col, weight=None):
    check_csr("csr_gather_sum", values, rowptr, col, weight)
    return values.new_empty(values.shape[:-1] + (rowptr.shape[0] - 1,))


def csr_gather_reduce_fake(values, rowptr, col, reduce):
    check_csr_reduce(values, rowptr, col, reduce)
    return values.new_empty(values.shape[:-1] + (rowptr.shape[0] - 1,))


def gather_channels_fake(tensors, dims, indices):
    dims = check_gather_channels(tensors, dims, indices)
    out = []
    for t, d, idx in zip(tensors, dims, indices):
        shape = list(t.shape)
        shape[d] = idx.shape[0]
        out.append(t.new_empty(shape))  # contiguous
    return out


def channel_scale_fake(x, scale, dim, per_sample=False):
    check_channel_scale(x, scale, dim, per_sample)
    return torch.empty_like(x)


def conv2d_sq_grad_sums_fake(x, g, kernel_size, stride, padding, dilation):
    k, _, _, _ = check_conv2d_sq_grad_sums(x, g, kernel_size, stride, padding, dilation)
    return x.new_empty((g.shape[1], x.shape[1]) + k)
