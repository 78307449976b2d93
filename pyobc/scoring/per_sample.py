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

from typing import Callable, Collection, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from ..layers import BATCH_NORMS, CONV, NORMS, STATISTICS_NORMS, WEIGHT_LAYERS, is_weight_layer
from . import position_pairs
from .capture import Record

__all__ = ["channel_dim", "per_sample_grads", "sq_grad_sums", "activation_rows", "MEMORY_BUDGET",
           "standard_forward", "modules_to_probe", "probe_channel_axes", "ChannelAxes", "gateable"]

#: bytes of per-sample gradients materialised at once; larger batches are processed in chunks
MEMORY_BUDGET = 256 * 2**20

#: a conv/linear layer whose sample (weight gradient, input and output gradient) takes more than half of
#: this, one core's L2 cache on the EPYC hosts we measure on, has "large samples": the path choices below
#: were measured with it (:func:`_large_samples`)
L2_BYTES = ops.reference.SQ_GRAD_CHUNK_BYTES  # the same measured size

#: 2-D convs (groups 1, one call) with at most this many output positions per sample, or with large samples
#: (:data:`L2_BYTES`), on CPU, get their squared sums from :func:`pyobc.ops.conv2d_sq_grad_sums`
#: (one sample per thread at a time, a BLAS product each). Against the grouped convolution in chunks,
#: batch 64 (bench/RESULTS.md, issue #15): 1.6x faster at 64 positions (64 channels), 3x at 16 (128),
#: 2.5x at 49 (512, batch 32); 0.8x at 256 positions and 0.45-0.8x at 1024, so those keep the chunks.
KERNEL_POSITIONS = 64

#: conv/linear layers with at most this many output positions per sample (summed over their calls) get
#: their squared sums from pairs of positions, one GEMM without per-sample gradients
#: (:mod:`~pyobc.scoring.position_pairs`); up to :data:`PAIR_POSITIONS_WHEN_ONE_SAMPLE` for layers with
#: large samples (:data:`L2_BYTES`). Measured on 32-sample batches (bench/RESULTS.md): pairs
#: win 25x at 1 position (512 channels), 1.8-4x at 4, 1.6x at 9 with 256 channels, and lose at 9 with
#: 16-64 channels (0.6-0.8x) and at 16 positions (0.4x).
PAIR_POSITIONS = 4
PAIR_POSITIONS_WHEN_ONE_SAMPLE = 9

#: output channel axes measured by :func:`probe_channel_axes` for the scoring run in progress
#: (module -> axis, or None for a layer whose output is not per-channel affine in its own parameters)


#: layer -> its probed output channel axis (None: no axis scales with its channel parameters), for the layers
#: whose class overrides ``forward``; the others follow their class (see :func:`channel_dim`)
ChannelAxes = Mapping[nn.Module, "int | None"]

def standard_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs the ``forward`` of the ``torch.nn`` class it derives from (not a subclass's own).

    Example:
        >>> class LN2d(nn.LayerNorm):
        ...     def forward(self, x):
        ...         return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        >>> standard_forward(nn.LayerNorm(4)), standard_forward(LN2d(4))
        (True, False)
    """
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn")), None)
    return base is not None and type(module).forward is base.forward


def channel_dim(module: nn.Module, axes: ChannelAxes) -> int:
    """The channel axis of a layer's output: the axis the probe measured (``axes``, from
    :func:`probe_channel_axes`; a scoring run keeps them in ``Context.channel_axes``) for layers with their
    own ``forward``, else 1 for conv/batch/group norm and -1 for linear/layer norm.

    Example:
        >>> ln = nn.LayerNorm(3)
        >>> channel_dim(nn.Conv2d(2, 3, 1), {}), channel_dim(ln, {}), channel_dim(ln, {ln: 1})
        (1, -1, 1)
    """
    axis = axes.get(module)
    if axis is not None:
        return axis
    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
        return -1
    return 1


def gateable(module: nn.Module, axes: ChannelAxes) -> bool:
    """False for a layer whose probe found no output axis along which scaling a channel's parameters
    scales that channel of the output (e.g. a norm subclass that applies an activation after the affine
    map): such layers get parameter gates and vmapped per-sample gradients instead of closed forms.

    Example:
        >>> bn = nn.BatchNorm2d(3)
        >>> gateable(bn, {}), gateable(bn, {bn: None})
        (True, False)
    """
    return module not in axes or axes[module] is not None


def modules_to_probe(model: nn.Module) -> dict[str, nn.Module]:
    """Conv/linear/norm layers whose class overrides ``forward``: their channel axis must be measured."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS + NORMS) and not standard_forward(m)}


def _out_slice(module: nn.Module, name: str, p: torch.Tensor, c: int) -> tuple:
    """Index of output channel ``c`` in parameter ``name`` (weights of transposed convs: axis 1)."""
    if name == "weight" and isinstance(module, CONV) and module.transposed:
        return (slice(None), c)
    return (c,)


def _out_channels(module: nn.Module) -> int | None:
    if isinstance(module, CONV + (nn.Linear,)):
        return module.out_channels if isinstance(module, CONV) else module.out_features
    params = [p for p in module.parameters(recurse=False)]
    return int(params[0].shape[0]) if params and all(p.dim() == 1 for p in params) else None


def _axis_of_change(y: torch.Tensor, y2: torch.Tensor, c: int, size: int) -> set[int]:
    """Axes ``a`` (other than the batch axis) of length ``size`` such that ``y2 - y`` is ``y`` at index ``c``
    along ``a`` and zero elsewhere (the output channel ``c`` doubled, nothing else changed)."""
    found = set()
    tol = 1e-4 * float(y.abs().max().clamp_min(1e-30)) if y.is_floating_point() else 0.0
    for a in range(1, y.dim()):
        if y.shape[a] != size:
            continue
        expected = torch.zeros_like(y)
        idx = (slice(None),) * a + (c,)
        expected[idx] = y[idx]
        if torch.allclose(y2 - y, expected, rtol=1e-4, atol=tol):
            found.add(a)
    return found


def _doubled_output(module: nn.Module, rec: Record, params: dict, c: int) -> torch.Tensor | None:
    doubled = {}
    for k, p in params.items():
        q = p.detach().clone()
        q[_out_slice(module, k, q, c)] *= 2
        doubled[k] = q
    with torch.no_grad():
        y2 = functional_call(module, doubled, rec.args, rec.kwargs)
    y2 = y2[0] if isinstance(y2, (tuple, list)) else y2
    return y2 if isinstance(y2, torch.Tensor) and y2.shape == rec.y.shape else None


def _probe_one(module: nn.Module, records: list[Record]) -> int | None:
    """The output axis along which doubling one channel's own parameters doubles that channel of the
    output and changes nothing else, in every recorded call; None if there is no such axis (a channel
    whose output is zero everywhere is consistent with any axis and decides nothing)."""
    params = dict(module.named_parameters(recurse=False))
    size = _out_channels(module)
    if not params or size is None or not all(isinstance(r.y, torch.Tensor) for r in records):
        return None
    axes = {a for a in range(1, records[0].y.dim()) if records[0].y.shape[a] == size}
    for rec in records:
        for c in sorted({0, size - 1}):
            y2 = _doubled_output(module, rec, params, c)
            if y2 is None:
                return None
            axes &= _axis_of_change(rec.y.detach(), y2, c, size)
    return axes.pop() if len(axes) == 1 else None


def probe_channel_axes(modules: Mapping[str, nn.Module],
                       records: Mapping[str, list[Record]]) -> dict[nn.Module, int | None]:
    """Measure the output channel axis of each of ``modules`` from its recorded calls (a forward pass under
    :class:`~pyobc.scoring.capture.Capture`), by doubling one channel's own parameters and seeing which
    output axis doubles at that index alone. None where no axis does (the layer is then scored through its
    parameters). Layers that were not called are left out.

    Example:
        >>> from pyobc.scoring.capture import Capture
        >>> class LN2d(nn.LayerNorm):
        ...     def forward(self, x):
        ...         return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        >>> ln = LN2d(4)
        >>> with Capture({"ln": ln}) as cap, torch.no_grad():
        ...     _ = ln(torch.randn(2, 4, 4, 4))
        >>> probe_channel_axes({"ln": ln}, cap.records) == {ln: 1}
        True
    """
    return {m: _probe_one(m, list(records.get(n, []))) for n, m in modules.items() if records.get(n)}


def _batch_dim(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


def _chunks(n: int, per_sample_bytes: int) -> list[slice]:
    step = max(1, MEMORY_BUDGET // max(1, per_sample_bytes))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _sq_chunks(module: nn.Module, calls: list[tuple[Record, list]], only: Collection[str] | None) -> list[slice]:
    """Sample chunks for :func:`sq_grad_sums`: :func:`_closed_form_step` for conv/linear closed forms
    (a sample's weight gradient plus its share of the layer's input and output gradient, the largest over
    the calls), :data:`MEMORY_BUDGET` otherwise (norms whose statistics span the batch, vmapped modules)."""
    n = calls[0][0].x.shape[_batch_dim(module)]
    grad_bytes = _param_bytes(module, only)
    if not (isinstance(module, CONV + (nn.Linear,)) and _closed_form_ok(module)):
        return _chunks(n, grad_bytes)
    step = _closed_form_step(calls, grad_bytes)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _sample_bytes(calls: list[tuple[Record, list]], grad_bytes: int) -> int:
    """What one sample of a conv/linear layer touches: its weight gradient, input and output (largest call)."""
    act = max((sum(t[0].numel() * t.element_size() for t in (rec.x, rec.y)
                   if isinstance(t, torch.Tensor) and t.dim() > 0) for rec, _ in calls), default=0)
    return grad_bytes + act


def _closed_form_step(calls: list[tuple[Record, list]], grad_bytes: int) -> int:
    """Samples per chunk of a conv/linear layer's per-sample gradients: as in the reference kernel of
    :func:`pyobc.ops.conv2d_sq_grad_sums` (:func:`pyobc.ops.reference.sq_chunk_samples`)."""
    return min(max(1, MEMORY_BUDGET // max(1, grad_bytes)),
               ops.reference.sq_chunk_samples(grad_bytes, _sample_bytes(calls, grad_bytes)))


def _large_samples(calls: list[tuple[Record, list]], grad_bytes: int) -> bool:
    """Whether two samples of a conv/linear layer do not fit in :data:`L2_BYTES`."""
    return 2 * _sample_bytes(calls, grad_bytes) > L2_BYTES


def _pair_sums(module: nn.Module, calls: list[tuple[Record, list]],
               only: Collection[str] | None) -> dict[str, torch.Tensor] | None:
    """Unscaled squared sums of a conv/linear layer with few output positions per sample, from pairs of
    positions (:mod:`~pyobc.scoring.position_pairs`); None where forming per-sample gradients is cheaper:
    more than :data:`PAIR_POSITIONS` positions (summed over the calls), or more than
    :data:`PAIR_POSITIONS_WHEN_ONE_SAMPLE` when one sample's gradient alone fills a chunk."""
    if not (_closed_form_ok(module) and (only is None or set(only) <= {"weight", "bias"})):
        return None
    reached = [(rec, grads[0].detach()) for rec, grads in calls if grads[0] is not None]
    counts = [position_pairs.position_count(module, g) for _, g in reached]
    if not reached or None in counts:
        return None
    large = _large_samples(calls, _param_bytes(module, only))
    if sum(counts) > (PAIR_POSITIONS_WHEN_ONE_SAMPLE if large else PAIR_POSITIONS):
        return None
    parts = [position_pairs.positions(module, rec.x.detach(), g) for rec, g in reached]
    out = {}
    if only is None or "weight" in only:
        out["weight"] = position_pairs.pair_sq_sums(parts).reshape(module.weight.shape)
    if module.bias is not None and (only is None or "bias" in only):
        per_sample_bias = sum(g.sum(1) for _, g in parts)
        out["bias"] = (per_sample_bias * per_sample_bias).sum(0)
    return out


def _kernel_sums(module: nn.Module, calls: list[tuple[Record, list]],
                 only: Collection[str] | None) -> dict[str, torch.Tensor] | None:
    """Unscaled squared sums of a CPU 2-D conv from :func:`pyobc.ops.conv2d_sq_grad_sums`; None where the
    op does not apply (other layers, groups, several calls, CUDA: the grouped convolution of cuDNN has not
    been measured against it) or is slower (see :data:`KERNEL_POSITIONS`)."""
    if not (isinstance(module, nn.Conv2d) and module.groups == 1 and _closed_form_ok(module) and len(calls) == 1
            and (only is None or set(only) <= {"weight", "bias"})):
        return None
    rec, grads = calls[0]
    x, g = rec.x, grads[0]
    if (g is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or g.dtype != x.dtype or x.dim() != 4):
        return None
    positions = g.shape[2] * g.shape[3]
    if positions > KERNEL_POSITIONS and not _large_samples(calls, _param_bytes(module, only)):
        return None
    out = {}
    if only is None or "weight" in only:
        out["weight"] = ops.conv2d_sq_grad_sums(x.detach(), g.detach(), module.kernel_size, module.stride,
                                                module.padding, module.dilation)
    if module.bias is not None and (only is None or "bias" in only):
        out["bias"] = g.detach().sum((2, 3)).square().sum(0)
    return out


def _conv_weight_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of a zero-padded conv (:func:`~pyobc.ops.reference.per_sample_conv_weight_grads`)."""
    return ops.reference.per_sample_conv_weight_grads(x, g, module.weight.shape, module.stride, module.padding,
                                                      module.dilation, module.groups)


def _closed_form_ok(module: nn.Module) -> bool:
    if not standard_forward(module):
        return False
    if isinstance(module, CONV):
        return (not module.transposed and module.padding_mode == "zeros" and not isinstance(module.padding, str))
    return isinstance(module, (nn.Linear, nn.LayerNorm) + STATISTICS_NORMS)


def _normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x-hat of a norm layer (its output before the affine transform), as computed in eval mode."""
    if isinstance(module, BATCH_NORMS):
        use_running = _running_stats(module)
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
        affine_x_hat = _running_stats(module) and x.shape == g.shape and x.dtype == g.dtype
        # per-sample sums of g: the bias gradients, and a term of batch norm's weight gradients
        g_sums = _norm_sample_sums(module, g) if module.bias is not None or affine_x_hat else None
        if module.weight is not None:
            out["weight"] = (_bn_weight_grads(module, x, g, g_sums) if affine_x_hat
                             else _norm_sample_sums(module, g * _normalized(module, x)))
        if module.bias is not None:
            out["bias"] = g_sums
    return out


def _running_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm that normalises with its running statistics (eval mode)."""
    return isinstance(module, BATCH_NORMS) and module.running_mean is not None and not module.training


def _bn_weight_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor, g_sums: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum g * x_hat`` of a batch norm's weight, with running statistics: ``x_hat = x * s + t``
    per channel, so the sum is ``s <g, x> + t sum(g)`` over each sample's positions: one fused channel dot
    (``g_sums`` = ``sum(g)``), without recomputing ``x_hat`` and multiplying it by ``g`` (two
    activation-sized temporaries per layer and batch in OBD)."""
    s = torch.rsqrt(module.running_var.to(x.dtype) + module.eps)
    t = -module.running_mean.to(x.dtype) * s
    return ops.channel_dot(g.detach(), x, 1, per_sample=True).to(x.dtype) * s + g_sums * t


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
    # the fused attention kernels (flash, memory-efficient) have no vmap batching rule: vmap would run
    # them once per sample, with a warning per call (nn.MultiheadAttention, Hugging Face attention);
    # the math backend is plain matmuls and softmax, which vmap batches
    with sdpa_kernel(SDPBackend.MATH):
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

    Several calls of one module in a forward pass are added per sample before squaring. Conv and linear
    layers with few output positions per sample (a linear layer on 2-D inputs: one) never form
    per-sample gradients (:mod:`~pyobc.scoring.position_pairs`); 2-D convs with up to
    :data:`KERNEL_POSITIONS` positions take them one sample per thread in a compiled op; the others form
    them in chunks of samples (:func:`_closed_form_step`).
    """
    total = _pair_sums(module, calls, only)
    if total is None:
        total = _kernel_sums(module, calls, only)
    if total is None:
        total = {}
        for sl in _sq_chunks(module, calls, only):
            acc: dict[str, torch.Tensor] = {}
            for rec, grads in calls:
                for k, v in per_sample_grads(module, rec, grads, 1.0, sl, only).items():
                    acc[k] = acc[k] + v if k in acc else v
            for k, v in acc.items():
                s = v.square().sum(0)
                total[k] = total[k] + s if k in total else s
    # the scale is applied once to the sums, not to every per-sample gradient
    return {k: v * (scale * scale) for k, v in total.items()} if scale != 1.0 else total


def activation_rows(kind: str, module: nn.Module, rec: Record, g: torch.Tensor, axes: ChannelAxes,
                    input_grad: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample channel rows ``(N, C)`` of a member from activations (METHODS.md identities).

    ``out``/``depthwise``/``norm``: ``sum over positions of G * Y`` per output channel.
    ``in``: ``sum over positions of X * (dL/dX through this layer)`` per input channel; ``input_grad``
    returns that gradient. ``axes``: the probed channel axes (see :func:`channel_dim`).
    """
    d = channel_dim(module, axes)
    if kind in ("out", "depthwise", "norm"):
        return ops.channel_dot(g.detach(), rec.y.detach(), d, per_sample=True)
    if kind == "in":
        return ops.channel_dot(rec.x.detach(), input_grad().detach(), d, per_sample=True)
    raise ValueError(f"no activation rows for member kind {kind!r}")


def supports_activation_rows(kind: str, module: nn.Module, axes: ChannelAxes) -> bool:
    """Whether :func:`activation_rows` covers this member (otherwise use per-sample gradients)."""
    if not gateable(module, axes):
        return False
    if kind in ("out", "depthwise", "in"):
        return is_weight_layer(module)
    if kind == "norm":
        return isinstance(module, NORMS) and (
            not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) == 1)
    return False
