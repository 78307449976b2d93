"""Pure-PyTorch reference implementations of the pyobc operators.

They serve every device when the compiled library is absent (and CUDA when the library was built
without CUDA kernels), and they are the tests' and benchmarks' second opinion (public for that reason:
``pyobc.ops.reference.channel_dot(...)``). They follow the compiled kernels'
output dtypes (float64 for float64 input, float32 otherwise), accumulate in float64 for
float32/float64 input and float32 for float16/bfloat16 (at least as precise as the compiled
kernels), and, unlike them, create full-size temporaries.
"""
from __future__ import annotations

import math

import torch

from ._checks import (accumulate_dtype, check_channel_dot, check_channel_scale, check_conv2d_sq_grad_sums, check_csr, check_csr_data, check_csr_reduce,
                      check_gather_channels, check_gather_indices_data, check_weight_channel_sums, result_dtype)


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


def csr_row_of(rowptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """The output row of every CSR entry: ``i`` repeated ``rowptr[i+1] - rowptr[i]`` times."""
    n = rowptr.numel() - 1
    return torch.repeat_interleave(torch.arange(n, device=rowptr.device), rowptr.diff(),
                                   output_size=nnz)


def _csr_entries(op, values, rowptr, col, weight=None):
    """(values as (R, S) in the accumulation dtype, entries (R, nnz), row of each entry)."""
    check_csr_data(op, values, rowptr, col)
    acc = accumulate_dtype(values.dtype)
    v = values.to(acc)
    v = v.unsqueeze(0) if v.dim() == 1 else v
    entries = v.index_select(1, col)
    if weight is not None:
        entries = entries * weight.to(acc)
    return v, entries, csr_row_of(rowptr, col.numel())


def _csr_out(values, out):
    out = out.to(values.dtype)
    return (out[0] if values.dim() == 1 else out).contiguous()


def csr_gather_sum(values, rowptr, col, weight=None):
    check_csr("csr_gather_sum", values, rowptr, col, weight)
    v, entries, row_of = _csr_entries("csr_gather_sum", values, rowptr, col, weight)
    out = v.new_zeros(v.shape[0], rowptr.numel() - 1).index_add_(1, row_of, entries)
    return _csr_out(values, out)


def csr_gather_reduce(values, rowptr, col, reduce):
    reduce = check_csr_reduce(values, rowptr, col, reduce)
    v, entries, row_of = _csr_entries("csr_gather_reduce", values, rowptr, col)
    shape = (v.shape[0], rowptr.numel() - 1)
    if reduce == "amax":
        # NaN propagates as in torch.amax (scatter_reduce would drop it on some paths)
        out = v.new_full(shape, float("-inf")).scatter_reduce_(
            1, row_of.expand_as(entries), entries, "amax", include_self=True)
        nan = v.new_zeros(shape).index_add_(1, row_of, entries.isnan().to(v.dtype))
        out = out.masked_fill(nan > 0, float("nan"))
    else:
        count = v.new_zeros(shape).index_add_(1, row_of, (entries != 0).to(v.dtype))
        if reduce == "count_nonzero":
            out = count
        else:
            out = v.new_zeros(shape).index_add_(1, row_of, entries) / count.clamp_min(1)
    return _csr_out(values, out)


def gather_channels(tensors, dims, indices):
    dims = check_gather_channels(tensors, dims, indices)
    check_gather_indices_data(tensors, dims, indices)
    return [t.index_select(d, idx).contiguous() for t, d, idx in zip(tensors, dims, indices)]


def channel_scale(x: torch.Tensor, scale: torch.Tensor, dim: int, per_sample: bool = False):
    dim = check_channel_scale(x, scale, dim, per_sample)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    if per_sample:
        shape[0] = x.shape[0]
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (x.to(compute) * scale.to(compute).reshape(shape)).to(x.dtype)


#: a chunk of samples in :func:`conv2d_sq_grad_sums` (one grouped weight-gradient convolution) holds at
#: most this many bytes of per-sample gradients (the convolution's output: one core's L2 on the machines we
#: measured on) and at most :data:`SQ_CHUNK_BYTES` of gradients, inputs and output gradients together.
#: Grouped convolutions get faster the more samples one call takes until their output spills: inside OBD
#: on ResNet-20 (batch 64, 2 threads) its 16- and 32-channel convs on 32x32 and 16x16 maps took 3.57 /
#: 2.77 / 1.95 ms with 1 MiB chunks of everything, 2.14 / 1.87 / 1.15 with 16 MiB; a 64-channel conv on
#: 8x8 maps (147 KB of gradient a sample) took 5.3 ms with 1 MiB chunks, 9.8 with 16 MiB
#: (bench/RESULTS.md, issue #15)
SQ_GRAD_CHUNK_BYTES = 2**20  # one core's L2, as pyobc.scoring.per_sample.L2_BYTES
SQ_CHUNK_BYTES = 16 * 2**20


def sq_chunk_samples(grad_bytes: int, sample_bytes: int) -> int:
    """Samples per grouped weight-gradient convolution for a layer whose per-sample gradient takes
    ``grad_bytes`` and whose sample (gradient, input and output gradient) ``sample_bytes`` (at least 1)."""
    return max(1, min(SQ_GRAD_CHUNK_BYTES // max(1, grad_bytes), SQ_CHUNK_BYTES // max(1, sample_bytes)))


def conv2d_sq_grad_sums(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation):
    """``sum_n (dL_n/dW)^2`` by grouped weight-gradient convolutions over chunks of samples (the samples
    become groups), squared and summed in the input's dtype (the terms are non-negative: nothing cancels).
    """
    k, s, p, d = check_conv2d_sq_grad_sums(x, g, kernel_size, stride, padding, dilation)
    shape = (g.shape[1], x.shape[1]) + k
    es = x.element_size()
    step = sq_chunk_samples(es * math.prod(shape), es * (math.prod(shape) + x[0].numel() + g[0].numel()))
    total = torch.zeros(shape, dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], step):
        total += per_sample_conv_weight_grads(x[i:i + step], g[i:i + step], shape, s, p, d).square().sum(0)
    return total


def per_sample_conv_weight_grads(x: torch.Tensor, g: torch.Tensor, weight_shape, stride, padding, dilation,
                                 groups: int = 1) -> torch.Tensor:
    """``(N, *weight_shape)``: each sample's weight gradient of a zero-padded 1-3 d convolution, from its
    input ``x`` and output gradient ``g``, as one grouped weight-gradient convolution (the samples become
    extra groups)."""
    n = x.shape[0]
    fn = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}[x.dim() - 2]
    gw = fn(x.reshape(1, -1, *x.shape[2:]), (n * weight_shape[0],) + tuple(weight_shape[1:]),
            g.reshape(1, -1, *g.shape[2:]), stride, padding, dilation, groups * n)
    return gw.view(n, *weight_shape)
