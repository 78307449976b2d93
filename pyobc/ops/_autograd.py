"""Autograd formulas of the pyobc operators (registered with torch.library.register_autograd).

Both ops are bilinear, so each input's gradient is the other input times the output gradient
broadcast back over the reduced dims. The formulas use differentiable torch ops, so double
backward works too.
"""
from __future__ import annotations


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
