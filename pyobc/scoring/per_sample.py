"""Per-sample quantities of one layer from its recorded input, output and output gradient.

Two things are needed per layer, without a Python loop over samples:

* squared per-sample gradients summed over the batch (OBD's diagonal empirical Fisher), and
* per-sample channel rows ``<grad of sample n, weights of channel c>`` (Jacobian rows of single samples,
  SOSP-I's output-space effects).

Closed forms cover linear, conv and norm layers (the per-sample weight gradient of a conv is one grouped
convolution-weight-gradient call over the whole batch); any other module falls back to
``torch.func.vmap`` of a vector-Jacobian product of that module alone. ``G`` is the gradient of the
*mean* batch loss, so one sample's own gradient is ``N * G[n]``; callers pass that scale.
"""
from __future__ import annotations

from typing import Callable, Collection

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..layers import BATCH_NORMS, CONV, NORMS, STATISTICS_NORMS, is_weight_layer
from .capture import Record

__all__ = ["channel_dim", "per_sample_grads", "sq_grad_sums", "activation_rows", "MEMORY_BUDGET"]

#: bytes of per-sample gradients materialised at once; larger batches are processed in chunks
MEMORY_BUDGET = 256 * 2**20

def channel_dim(module: nn.Module) -> int:
    """The channel axis of a layer's activations (1 for conv/batch/group norm, -1 for linear/layer norm)."""
    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
        return -1
    return 1


def _batch_dim(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


def _chunks(n: int, per_sample_bytes: int) -> list[slice]:
    step = max(1, MEMORY_BUDGET // max(1, per_sample_bytes))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _conv_weight_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of a zero-padded conv: the samples become extra groups."""
    n = x.shape[0]
    fn = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}[x.dim() - 2]
    w_shape = (n * module.out_channels,) + tuple(module.weight.shape[1:])
    gw = fn(x.reshape(1, -1, *x.shape[2:]), w_shape, g.reshape(1, -1, *g.shape[2:]),
            module.stride, module.padding, module.dilation, module.groups * n)
    return gw.view(n, *module.weight.shape)


def _closed_form_ok(module: nn.Module) -> bool:
    if isinstance(module, CONV):
        return (not module.transposed and module.padding_mode == "zeros" and not isinstance(module.padding, str))
    return isinstance(module, (nn.Linear, nn.LayerNorm) + STATISTICS_NORMS)


def _normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x-hat of a norm layer (its output before the affine transform), as computed in eval mode."""
    if isinstance(module, BATCH_NORMS):
        use_running = module.running_mean is not None and not module.training
        return F.batch_norm(x, module.running_mean if use_running else None,
                            module.running_var if use_running else None, None, None,
                            not use_running, 0.0, module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
    raise TypeError(type(module).__name__)


def _norm_sample_sums(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Sum a norm-activation-shaped tensor over everything but (sample, affine element)."""
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        return t.reshape(t.shape[0], -1, *t.shape[t.dim() - k:]).sum(1)
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def _closed_form_grads(module: nn.Module, rec: Record, g: torch.Tensor, sl: slice) -> dict[str, torch.Tensor]:
    x = rec.x.detach()[sl]
    g = g[sl]
    out: dict[str, torch.Tensor] = {}
    if isinstance(module, nn.Linear):
        x2, g2 = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        out["weight"] = torch.bmm(g2.transpose(1, 2), x2)
        if module.bias is not None:
            out["bias"] = g2.sum(1)
    elif isinstance(module, CONV):
        out["weight"] = _conv_weight_grads(module, x, g)
        if module.bias is not None:
            out["bias"] = g.reshape(g.shape[0], g.shape[1], -1).sum(-1)
    else:  # norms
        if module.weight is not None:
            out["weight"] = _norm_sample_sums(module, g * _normalized(module, x))
        if module.bias is not None:
            out["bias"] = _norm_sample_sums(module, g)
    return out


def _vmap_grads(module: nn.Module, rec: Record, grads: list, sl: slice,
                only: Collection[str] | None) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``module``'s parameters (local names in ``only``, default all) by vmap
    over a vector-Jacobian product of the module alone."""
    from torch.func import functional_call, vjp, vmap

    all_params = {k: v.detach() for k, v in module.named_parameters()}
    params = {k: v for k, v in all_params.items() if only is None or k in only}
    fixed = {k: v for k, v in all_params.items() if k not in params}
    bd = _batch_dim(module)
    args = [a.detach()[(slice(None),) * bd + (sl,)] if isinstance(a, torch.Tensor) else a for a in rec.args]
    kwargs = {k: v for k, v in rec.kwargs.items()}
    outs = rec.output if isinstance(rec.output, (tuple, list)) else (rec.output,)
    cots = tuple(None if (gr is None or not isinstance(o, torch.Tensor)) else gr[(slice(None),) * bd + (sl,)]
                 for o, gr in zip(outs, list(grads) + [None] * len(outs)))
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def one(*per_sample):
        sample_args = list(args)
        for i, t in zip(tensor_pos, per_sample[: len(tensor_pos)]):
            sample_args[i] = t.unsqueeze(bd)
        sample_cots = per_sample[len(tensor_pos):]

        def f(p):
            res = functional_call(module, {**fixed, **p}, tuple(sample_args), kwargs)
            res = res if isinstance(res, (tuple, list)) else (res,)
            return tuple(r for r, c in zip(res, cots) if c is not None)

        _, pull = vjp(f, params)
        return pull(tuple(c.unsqueeze(bd) for c in sample_cots))[0]

    present = [c for c in cots if c is not None]
    in_dims = tuple(bd for _ in tensor_pos) + tuple(bd for _ in present)
    return vmap(one, in_dims=in_dims)(*[args[i] for i in tensor_pos], *present)


def per_sample_grads(module: nn.Module, rec: Record, grads: list, scale: float = 1.0,
                     sl: slice | None = None, only: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``(n, *param.shape)`` of ``module``'s own parameters from one recorded call.

    ``grads`` holds the gradient for each output of the call (``grads[0]`` for the main output);
    ``scale`` multiplies the result (``N`` turns mean-loss gradients into per-sample-loss gradients);
    ``only`` restricts the result to these local parameter names.
    """
    n = rec.x.shape[_batch_dim(module)]
    sl = slice(0, n) if sl is None else sl
    if grads[0] is None:
        return {k: torch.zeros((sl.stop - sl.start,) + tuple(v.shape), dtype=v.dtype, device=v.device)
                for k, v in module.named_parameters() if only is None or k in only}
    own = {"weight", "bias"}
    if _closed_form_ok(module) and (only is None or set(only) <= own):
        res = _closed_form_grads(module, rec, grads[0].detach(), sl)
        if only is not None:
            res = {k: v for k, v in res.items() if k in only}
    else:
        res = _vmap_grads(module, rec, grads, sl, only)
    if scale != 1.0:
        res = {k: v * scale for k, v in res.items()}
    return res


def _param_bytes(module: nn.Module, only: Collection[str] | None) -> int:
    return sum(p.numel() * p.element_size() for k, p in module.named_parameters() if only is None or k in only)


def sq_grad_sums(module: nn.Module, calls: list[tuple[Record, list]], scale: float,
                 only: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """``sum_n (scale * per-sample grad)^2`` for each of ``module``'s own parameters (local names).

    Several calls of one module in a forward pass are added per sample before squaring. A linear layer
    on 2-D inputs called once never materialises per-sample gradients: ``sum_n (G[n,o] X[n,i])^2`` is
    the matrix product ``(G^2)^T (X^2)``.
    """
    rec0, grads0 = calls[0]
    if (len(calls) == 1 and isinstance(module, nn.Linear) and rec0.x.dim() == 2 and grads0[0] is not None
            and (only is None or set(only) <= {"weight", "bias"})):
        x, g = rec0.x.detach(), grads0[0].detach() * scale
        out = {"weight": (g * g).t().mm(x * x)}
        if module.bias is not None:
            out["bias"] = (g * g).sum(0)
        return {k: v for k, v in out.items() if only is None or k in only}
    n = rec0.x.shape[_batch_dim(module)]
    total: dict[str, torch.Tensor] = {}
    for sl in _chunks(n, _param_bytes(module, only)):
        acc: dict[str, torch.Tensor] = {}
        for rec, grads in calls:
            for k, v in per_sample_grads(module, rec, grads, scale, sl, only).items():
                acc[k] = acc[k] + v if k in acc else v
        for k, v in acc.items():
            s = v.square().sum(0)
            total[k] = total[k] + s if k in total else s
    return total


def activation_rows(kind: str, module: nn.Module, rec: Record, g: torch.Tensor,
                    input_grad: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample channel rows ``(N, C)`` of a member from activations (METHODS.md identities).

    ``out``/``depthwise``/``norm``: ``sum over positions of G * Y`` per output channel.
    ``in``: ``sum over positions of X * (dL/dX through this layer)`` per input channel; ``input_grad``
    returns that gradient.
    """
    d = channel_dim(module)
    if kind in ("out", "depthwise", "norm"):
        return ops.channel_dot(g.detach(), rec.y.detach(), d, per_sample=True)
    if kind == "in":
        return ops.channel_dot(rec.x.detach(), input_grad().detach(), d, per_sample=True)
    raise ValueError(f"no activation rows for member kind {kind!r}")


def supports_activation_rows(kind: str, module: nn.Module) -> bool:
    """Whether :func:`activation_rows` covers this member (otherwise use per-sample gradients)."""
    if kind in ("out", "depthwise", "in"):
        return is_weight_layer(module)
    if kind == "norm":
        return isinstance(module, NORMS) and (
            not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) == 1)
    return False
