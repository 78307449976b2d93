"""Autograd formulas of the pyobc operators (registered with torch.library.register_autograd).

``channel_dot``, ``channel_scale`` and ``weight_channel_sums`` are bilinear (``channel_dot`` and
``channel_scale`` are each other's adjoints; channel_scale's formulas are written with both ops): each input's gradient is the other input
times the output gradient broadcast back over the reduced dims. ``csr_gather_sum`` is linear in its
values (the gradient is the transposed map) and bilinear in (values, weight); ``csr_gather_reduce``
routes the gradient to the entries that made each output; ``gather_channels`` scatters it back to the
kept positions. The formulas use differentiable torch ops, so double backward works too.
"""
from __future__ import annotations

import torch

from .reference import csr_row_of


def channel_dot_setup_context(ctx, inputs, output):
    a, b, dim, per_sample = inputs
    ctx.save_for_backward(a, b)
    ctx.dim = dim % a.dim()
    ctx.per_sample = per_sample


def channel_dot_backward(ctx, grad):
    a, b = ctx.saved_tensors
    shape = [1] * a.dim()
    shape[ctx.dim] = a.shape[ctx.dim]
    if ctx.per_sample:
        shape[0] = a.shape[0]
    g = grad.reshape(shape)
    grad_a = (b * g).to(a.dtype) if ctx.needs_input_grad[0] else None
    grad_b = (a * g).to(b.dtype) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None, None


def channel_scale_setup_context(ctx, inputs, output):
    x, scale, dim, per_sample = inputs
    ctx.save_for_backward(x, scale)
    ctx.dim = dim % x.dim()
    ctx.per_sample = per_sample


def channel_scale_backward(ctx, grad):
    """``d(x * s)/dx = s`` broadcast (channel_scale again) and ``d/ds = sum of grad * x`` over the
    broadcast dims (channel_dot): both are pyobc ops with formulas, so double backward works."""
    x, scale = ctx.saved_tensors
    grad_x = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.pyobc.channel_scale(grad, scale, ctx.dim, ctx.per_sample)
    if ctx.needs_input_grad[1]:
        grad_scale = torch.ops.pyobc.channel_dot(grad, x, ctx.dim, ctx.per_sample).to(scale.dtype)
    return grad_x, grad_scale, None, None


def weight_channel_sums_setup_context(ctx, inputs, output):
    w, t, groups = inputs
    ctx.save_for_backward(w, t)
    ctx.groups = groups


def weight_channel_sums_backward(ctx, grad_out, grad_in):
    w, t = ctx.saved_tensors
    out_ch, in_per_group = w.shape[0], w.shape[1]
    groups = ctx.groups
    kernel_ones = [1] * (w.dim() - 2)
    # coef[o, j] = grad_out[o] + grad_in[group(o) * I/groups + j], broadcast over the kernel dims
    coef = None
    if grad_out is not None:
        coef = grad_out.reshape(out_ch, 1, *kernel_ones)
    if grad_in is not None:
        g_in = (grad_in.reshape(groups, 1, in_per_group)
                .expand(groups, out_ch // groups, in_per_group)
                .reshape(out_ch, in_per_group, *kernel_ones))
        coef = g_in if coef is None else coef + g_in
    if coef is None:
        return None, None, None
    grad_w = (t * coef).to(w.dtype) if ctx.needs_input_grad[0] else None
    grad_t = (w * coef).to(t.dtype) if ctx.needs_input_grad[1] else None
    return grad_w, grad_t, None


# --------------------------------------------------------------------------------------------
# CSR ops. csr_gather_sum is linear in values (its gradient is the transposed map applied to the
# output gradient, computed with csr_gather_sum itself, so it is deterministic and twice
# differentiable) and bilinear in (values, weight). The transposed map is built in the backward
# (a stable sort of col: O(nnz log nnz), small next to the rows it serves).
# --------------------------------------------------------------------------------------------

def _csr_transpose(rowptr, col, num_cols):
    """(rowptr_t, perm, row_of): entries sorted by column (stably), so that
    ``csr_gather_sum(x, rowptr_t, perm)`` sums, per column, the entries ``x[..., k]`` that hit it
    (in the original entry order), and ``row_of[k]`` is the output row of entry ``k``."""
    sorted_col, perm = torch.sort(col, stable=True)
    rowptr_t = torch.searchsorted(sorted_col, torch.arange(num_cols + 1, device=col.device))
    return rowptr_t, perm, csr_row_of(rowptr, col.numel())


def csr_gather_sum_setup_context(ctx, inputs, output):
    values, rowptr, col, weight = inputs
    ctx.num_cols = values.shape[-1]
    ctx.save_for_backward(values, rowptr, col, weight)


def csr_gather_sum_backward(ctx, grad):
    values, rowptr, col, weight = ctx.saved_tensors
    rowptr_t, perm, row_of = _csr_transpose(rowptr, col, ctx.num_cols)
    grad_values = grad_weight = None
    if ctx.needs_input_grad[0]:
        w_t = None if weight is None else weight.index_select(0, perm)
        grad_values = torch.ops.pyobc.csr_gather_sum(grad, rowptr_t, row_of.index_select(0, perm),
                                                     w_t)
    if weight is not None and ctx.needs_input_grad[3]:
        prod = grad.index_select(-1, row_of) * values.index_select(-1, col)
        grad_weight = prod.sum(0) if prod.dim() == 2 else prod
    return grad_values, None, None, grad_weight


def csr_gather_reduce_setup_context(ctx, inputs, output):
    values, rowptr, col, reduce = inputs
    ctx.reduce = reduce
    ctx.num_cols = values.shape[-1]
    ctx.save_for_backward(values, rowptr, col, output if reduce == "amax" else None)


def csr_gather_reduce_backward(ctx, grad):
    """amax: the gradient is shared evenly among the entries equal to the maximum (as torch.amax
    does); mean_nonzero: every entry of a row gets grad / max(count_nonzero, 1) (the count is a
    step function of the values, treated as a constant); count_nonzero: no gradient."""
    if ctx.reduce == "count_nonzero" or not ctx.needs_input_grad[0]:
        return None, None, None, None
    values, rowptr, col, out = ctx.saved_tensors
    rowptr_t, perm, row_of = _csr_transpose(rowptr, col, ctx.num_cols)
    if ctx.reduce == "amax":
        entries = values.index_select(-1, col)
        hit = (entries == out.index_select(-1, row_of)).to(grad.dtype)
        ties = torch.ops.pyobc.csr_gather_sum(hit, rowptr,
                                              torch.arange(col.numel(), device=col.device))
        share = hit * (grad / ties.clamp_min(1)).index_select(-1, row_of)
        grad_values = torch.ops.pyobc.csr_gather_sum(share, rowptr_t, perm)
    else:  # mean_nonzero
        count = torch.ops.pyobc.csr_gather_reduce(values.detach(), rowptr, col, "count_nonzero")
        share = grad / count.clamp_min(1)
        grad_values = torch.ops.pyobc.csr_gather_sum(share, rowptr_t,
                                                     row_of.index_select(0, perm))
    return grad_values, None, None, None


# --------------------------------------------------------------------------------------------
# gather_channels: the gradient of an index_select is an index_add into zeros.
# --------------------------------------------------------------------------------------------

def gather_channels_setup_context(ctx, inputs, output):
    tensors, dims, indices = inputs
    n = len(tensors)
    ctx.n = n
    ctx.meta = [(t.shape, t.dtype, t.device, d % t.dim()) for t, d in zip(tensors, dims)]
    ctx.wants = list(ctx.needs_input_grad[:n])
    ctx.save_for_backward(*indices)


def gather_channels_backward(ctx, grads):
    indices = ctx.saved_tensors
    out = []
    for (shape, dtype, device, d), idx, g, wants in zip(ctx.meta, indices, grads, ctx.wants):
        if not wants or g is None or not (dtype.is_floating_point or dtype.is_complex):
            out.append(None)
            continue
        out.append(torch.zeros(shape, dtype=g.dtype, device=device).index_add(d, idx, g))
    return out, None, [None] * ctx.n
