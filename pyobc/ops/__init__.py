"""Fused channel reductions and index ops used by pyobc's scoring and pruning hot paths.

Every op is a ``torch.ops.pyobc.*`` operator: compiled C++/CUDA kernels (``pyobc._C``, PyTorch
stable ABI) when the extension is built, pure-PyTorch reference kernels otherwise, with the same
schema, Python API, autograd formulas and ``torch.compile`` support either way.
:func:`backend_report` says which implementation serves which device.

Environment: ``PYOBC_DISABLE_EXT=1`` skips the compiled library (reference kernels only, no
warning). When the library exists but fails to load, importing this module emits one
``RuntimeWarning`` with the reason.

Ops: :func:`channel_dot` and :func:`weight_channel_sums` (per-channel product reductions),
:func:`channel_scale` (the broadcast product ``x * scale`` along a channel dim, channel_dot's adjoint),
:func:`csr_gather_sum` and :func:`csr_gather_reduce` (block-sparse accumulation: every output sums,
or reduces, its own list of input positions; Layout's maps), :func:`gather_channels` (structured
slicing of many tensors in one call), :func:`conv2d_sq_grad_sums` (OBD's sums of squared per-sample
weight gradients of a convolution, without forming them batch-wide).

Memory layout of the channel reductions: contiguous inputs, channels_last (and channels_last_3d)
inputs and any other dense permutation of a contiguous tensor (e.g. a transpose) are read in
place, provided both inputs share strides (and, for ``per_sample=True`` and for weights, dim 0 is
outermost in memory). Any other layout (slices with gaps, broadcast/expanded tensors, inputs with different strides) is
first copied to a contiguous tensor, which costs one full-size temporary per input.

Overhead: a compiled op costs a few microseconds per call in C++. The Python autograd layer that
``torch.library.register_autograd`` adds (tens of microseconds) is skipped by these wrappers when
no input requires grad (or grad mode is off), and arguments are validated in Python only when a
call fails (to raise the precise error), so small inputs stay cheap.
"""
from __future__ import annotations

import torch

from . import _registry
from ._checks import (check_channel_dot, check_channel_scale, check_conv2d_sq_grad_sums, check_csr, check_csr_data, check_csr_reduce,
                    check_gather_channels, check_weight_channel_sums)

__all__ = ["channel_dot", "channel_scale", "weight_channel_sums", "csr_gather_sum", "csr_gather_reduce",
           "gather_channels", "conv2d_sq_grad_sums", "backend_report"]

_registry.install()


def channel_dot(a: torch.Tensor, b: torch.Tensor, dim: int = 1,
                per_sample: bool = False) -> torch.Tensor:
    """Per-channel dot products: ``(a * b)`` summed over every dim except ``dim``.

    Args:
        a, b: tensors of the same shape, dtype (float32, float64, float16 or bfloat16) and device.
        dim: the channel dim (may be negative), e.g. 1 for (N, C, H, W) activations, -1 for
            (N, T, C) tokens.
        per_sample: keep dim 0 (the batch) as well; needs ``a.dim() >= 2`` and ``dim`` not 0.

    Returns:
        shape ``(C,)``, or ``(N, C)`` with ``per_sample=True`` (``C = a.shape[dim]``); float64 for
        float64 input, float32 otherwise. Accumulation never drops below float32: float64 input
        is summed in float64; float32 input in short float32 blocks (at most 256 products, or
        16 rows of a channel, on CPU) whose sums are added in float64 (float64 throughout on
        CUDA); float16/bfloat16 in float32. One pass over the inputs, no full-size temporary
        (for the supported layouts, see the module docstring). Differentiable in both inputs.

    Raises:
        TypeError: non-tensor arguments, unsupported or different dtypes, non-int ``dim``.
        ValueError: different shapes or devices, ``dim`` out of range, bad ``per_sample`` use.

    Example:
        >>> import torch, pyobc.ops
        >>> y, g = torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4)
        >>> pyobc.ops.channel_dot(y, g, dim=1).shape        # sum over n, h, w
        torch.Size([16])
        >>> pyobc.ops.channel_dot(y, g, dim=1, per_sample=True).shape   # sum over h, w
        torch.Size([8, 16])
        >>> torch.allclose(pyobc.ops.channel_dot(y, g), (y * g).sum((0, 2, 3)), atol=1e-5)
        True
    """
    if type(dim) is not int or type(per_sample) is not bool:  # e.g. a numpy int: normalise
        dim = check_channel_dot(a, b, dim, per_sample)
    return _registry.call(torch.ops.pyobc.channel_dot.default, (a, b, dim, per_sample), (a, b),
                          lambda: check_channel_dot(a, b, dim, per_sample))


def channel_scale(x: torch.Tensor, scale: torch.Tensor, dim: int = 1,
                  per_sample: bool = False) -> torch.Tensor:
    """``x * scale`` with ``scale`` broadcast along channel ``dim`` (and along dim 0 with ``per_sample``).

    The adjoint of :func:`channel_dot`, for gating activations channel by channel: its backward is
    one ``channel_scale`` (for ``x``) and one ``channel_dot`` (for ``scale``), which sums
    ``grad * x`` without a full-size temporary (1.9x faster than the eager multiply-and-sum on
    64x64x32x32 activations, `bench/bench_ops.py`). Its derivatives are pyobc ops again, so it can be
    differentiated twice. (pyobc's own gated passes keep torch's multiply on CPU: there, the Python
    autograd layer of a registered op cost more than the fusion saved; see bench/RESULTS.md.)

    Args:
        x: float32, float64, float16 or bfloat16 tensor.
        scale: ``(C,)``, or ``(N, C)`` with ``per_sample=True`` (``C = x.shape[dim]``,
            ``N = x.shape[0]``); the device of ``x``.
        dim: the channel dim (may be negative).
        per_sample: one row of scales per sample of dim 0.

    Returns:
        a tensor shaped like ``x`` in its dtype (with its strides when ``x`` is dense: contiguous,
        channels_last, permuted; else contiguous). 16-bit inputs are multiplied in float32 and
        rounded once.

    Under forward-mode AD or a functorch transform (which the op has no formulas for), and when
    ``scale`` has another dtype than ``x`` (e.g. float32 gates on bfloat16 activations under
    autocast), the same product is computed with torch's broadcast multiply (with its type
    promotion). Calling ``torch.ops.pyobc.channel_scale`` directly requires equal dtypes.

    Raises:
        TypeError: non-tensors, unsupported dtypes, non-int ``dim``.
        ValueError: ``scale`` of the wrong shape, devices differ, ``dim`` out of range.

    Example:
        >>> import torch, pyobc.ops
        >>> x, s = torch.randn(8, 16, 4, 4), torch.randn(16)
        >>> torch.equal(pyobc.ops.channel_scale(x, s, dim=1), x * s.view(1, 16, 1, 1))
        True
        >>> pyobc.ops.channel_scale(torch.randn(8, 5, 3), torch.randn(8, 3), dim=-1, per_sample=True).shape
        torch.Size([8, 5, 3])
    """
    if type(dim) is not int or type(per_sample) is not bool:  # e.g. a numpy int: normalise
        dim = check_channel_scale(x, scale, dim, per_sample)
    if (isinstance(x, torch.Tensor) and isinstance(scale, torch.Tensor)
            and (scale.dtype != x.dtype or _registry.forward_transforms_active())):
        return _broadcast_scale(x, scale, dim, per_sample)
    return _registry.call(torch.ops.pyobc.channel_scale.default, (x, scale, dim, per_sample), (x, scale),
                          lambda: check_channel_scale(x, scale, dim, per_sample))


def _broadcast_scale(x: torch.Tensor, scale: torch.Tensor, dim: int, per_sample: bool) -> torch.Tensor:
    """channel_scale's product with torch's broadcast multiply (and its dtype promotion)."""
    d = check_channel_scale(x, scale.to(x.dtype), dim, per_sample)  # everything but the dtypes
    shape = [1] * x.dim()
    shape[d] = x.shape[d]
    if per_sample:
        shape[0] = x.shape[0]
    return x * scale.reshape(shape)


def weight_channel_sums(w: torch.Tensor, t: torch.Tensor,
                        groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-channel and in-channel sums of ``w * t`` for a conv/linear weight, in one pass.

    ``w`` and ``t`` have the weight's shape ``(O, I // groups, *kernel)`` (a linear weight is
    ``(O, I)``); ``t`` is typically the gradient or a Hessian-vector product, so the sums are the
    out-/in-channel Taylor or second-order terms of a layer (grouped and depthwise convs included).

    Returns:
        ``(out_sums, in_sums)`` with ``out_sums[o] = sum_{j,k} w[o,j,k] t[o,j,k]`` (shape ``(O,)``)
        and, for ``o`` in group ``g = o // (O // groups)``,
        ``in_sums[g * (I // groups) + j] = sum_{o in g, k} w[o,j,k] t[o,j,k]`` (shape ``(I,)``).
        Same dtype and accumulation rules as :func:`channel_dot`. Differentiable in ``w``, ``t``.

    Raises:
        TypeError: non-tensor arguments, unsupported or different dtypes, non-int ``groups``.
        ValueError: different shapes or devices, fewer than 2 dims, ``groups`` < 1 or not
            dividing ``O``.

    Example:
        >>> import torch, pyobc.ops
        >>> conv = torch.nn.Conv2d(8, 6, 3, groups=2)
        >>> g = torch.randn_like(conv.weight)
        >>> out_sums, in_sums = pyobc.ops.weight_channel_sums(conv.weight.detach(), g, groups=2)
        >>> out_sums.shape, in_sums.shape
        (torch.Size([6]), torch.Size([8]))
    """
    if type(groups) is not int:
        groups = check_weight_channel_sums(w, t, groups)
    return _registry.call(torch.ops.pyobc.weight_channel_sums.default, (w, t, groups), (w, t),
                          lambda: check_weight_channel_sums(w, t, groups))


def csr_gather_sum(values: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
                   weight: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
    """Sparse (CSR) matrix times dense rows: ``out[r, i] = sum_k weight[k] * values[r, col[k]]``
    over ``k`` in ``rowptr[i] .. rowptr[i+1]-1``.

    One call replaces a loop of index_select/index_add (or of slices and adds): every output
    position sums its own list of input positions. Layout (:mod:`pyobc.scoring.layout`) maps
    parameter sums to member channels and member channels to group channels this way.

    Args:
        values: ``(S,)`` or ``(R, S)`` (rows: samples, batches...), float32, float64, float16 or
            bfloat16, any strides (a view of a row-batched history is read in place).
        rowptr: ``(N+1,)`` int64 offsets, ``rowptr[0] == 0``, non-decreasing,
            ``rowptr[N] == col.numel()``.
        col: ``(nnz,)`` int64 positions in ``[0, S)``.
        weight: optional ``(nnz,)`` with the dtype of ``values`` (default: all ones).
        check: validate the index data on CUDA (a device sync). The CPU kernel always
            validates; with ``check=False`` a CUDA call with bad indices never reads out of
            bounds but gives NaN for the affected outputs.

    Returns:
        ``(N,)`` or ``(R, N)``, contiguous, the dtype of ``values``. Each output sums its
        entries in the order of ``k`` in one accumulator (float64 for float32/float64 values,
        float32 for float16/bfloat16), so results are deterministic (no atomics) and do not
        depend on the thread count. Empty rows give 0. Differentiable in ``values`` (the
        transposed map) and ``weight``.

    Raises:
        TypeError: non-tensor arguments, wrong dtypes (values float, rowptr/col int64, weight
            the dtype of values).
        ValueError: wrong ranks or sizes, different devices.
        RuntimeError: a malformed ``rowptr`` or ``col`` entries outside ``[0, S)``.

    Example:
        >>> import torch, pyobc.ops
        >>> values = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> rowptr, col = torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 1])
        >>> pyobc.ops.csr_gather_sum(values, rowptr, col)   # rows: v0+v2, (empty), v1
        tensor([[ 4.,  0.,  2.],
                [10.,  0.,  5.]])
    """
    if check and not (isinstance(values, torch.Tensor) and values.is_cpu):
        check_csr("csr_gather_sum", values, rowptr, col, weight)
        check_csr_data("csr_gather_sum", values, rowptr, col)  # a device sync
    return _registry.call(torch.ops.pyobc.csr_gather_sum.default, (values, rowptr, col, weight),
                          (values, weight),
                          lambda: check_csr("csr_gather_sum", values, rowptr, col, weight))


def csr_gather_reduce(values: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
                      reduce: str, *, check: bool = True) -> torch.Tensor:
    """Like :func:`csr_gather_sum` (same arguments, shapes and checks), with another reduction
    of each output's entries ``values[r, col[k]]``:

    * ``"amax"``: the maximum (``-inf`` for an empty row; NaN if any entry is NaN). Gradient:
      shared evenly among the entries equal to the maximum, as for :func:`torch.amax`.
    * ``"count_nonzero"``: how many entries are non-zero (NaN counts), in the values' dtype.
      No gradient.
    * ``"mean_nonzero"``: the sum over the non-zero entries divided by their count (0 if none).
      Gradient: ``grad / max(count, 1)`` for every entry (the count is treated as a constant).

    Example:
        >>> import torch, pyobc.ops
        >>> v, rowptr, col = torch.tensor([0., 2., 4.]), torch.tensor([0, 3]), torch.tensor([0, 1, 2])
        >>> [pyobc.ops.csr_gather_reduce(v, rowptr, col, r).item()
        ...  for r in ("amax", "count_nonzero", "mean_nonzero")]
        [4.0, 2.0, 3.0]
    """
    if check and not (isinstance(values, torch.Tensor) and values.is_cpu):
        check_csr_reduce(values, rowptr, col, reduce)
        check_csr_data("csr_gather_reduce", values, rowptr, col)  # a device sync
    return _registry.call(torch.ops.pyobc.csr_gather_reduce.default,
                          (values, rowptr, col, reduce), (values,),
                          lambda: check_csr_reduce(values, rowptr, col, reduce))


def gather_channels(tensors, dims, indices) -> list[torch.Tensor]:
    """Structured slicing of many tensors in one call: ``out[i] =
    tensors[i].index_select(dims[i], indices[i])``, as a new contiguous tensor.

    The pruning step slices every weight, bias and normalisation statistic this way (a weight
    pruned along two dims is sliced by two calls). One parallel region on CPU, one kernel on CUDA
    for all tensors of a device (a list spanning devices is split into one call per device); any
    fixed-size dtype (float, half, bfloat16, complex, integer, bool).

    Args:
        tensors: list of tensors (at least 1-d).
        dims: one dim per tensor (may be negative).
        indices: one 1-d int64 index tensor per tensor, on its device, entries in
            ``[0, tensors[i].shape[dims[i]])`` (repeats allowed).

    Returns:
        list of new contiguous tensors (same dtype and device). Differentiable: the gradient of
        ``tensors[i]`` is ``output gradient`` index-added into zeros along ``dims[i]``.

    Raises:
        TypeError: non-list arguments, non-tensors, unsupported dtypes, non-int64 indices.
        ValueError: lists of different lengths, ``dims[i]`` out of range, index tensors that are
            not 1-d or on another device.
        RuntimeError: index entries out of range (checked by the kernels, before any copy).

    Example:
        >>> import torch, pyobc.ops
        >>> w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
        >>> keep = torch.tensor([0, 2, 5])
        >>> w2, b2 = pyobc.ops.gather_channels([w, b], [0, 0], [keep, keep])
        >>> w2.shape, torch.equal(b2, b[keep])
        (torch.Size([3, 4, 3, 3]), True)
    """
    def validate():
        check_gather_channels(tensors, dims, indices, one_device=False)

    op = torch.ops.pyobc.gather_channels.default
    if not isinstance(tensors, (list, tuple)) or not tensors:
        validate()  # a TypeError for non-lists; for an empty list (the op needs a tensor to
        return []   # dispatch on) there is nothing to do, once the other lists are checked
    try:
        return list(_registry.call(op, (tensors, dims, indices), tensors, validate))
    except (RuntimeError, ValueError) as exc:  # valid arguments, but maybe several devices
        error = exc
    devices = list(dict.fromkeys(t.device for t in tensors))
    if len(devices) == 1:
        raise error
    out: list = [None] * len(tensors)  # one call per device
    for device in devices:
        pos = [i for i, t in enumerate(tensors) if t.device == device]
        part = _registry.call(op, ([tensors[i] for i in pos], [dims[i] for i in pos],
                                   [indices[i] for i in pos]), tensors, validate)
        for i, t in zip(pos, part):
            out[i] = t
    return out


def conv2d_sq_grad_sums(x: torch.Tensor, g: torch.Tensor, kernel_size, stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1)) -> torch.Tensor:
    """``sum_n (dL_n/dW)^2``: the squared per-sample weight gradients of a 2-D convolution (groups 1,
    zero padding), summed over the samples, as OBD's diagonal Fisher needs them.

    Sample ``n``'s weight gradient is ``G_n P_n``: its output gradient ``G_n`` (Co, L) times its
    patch rows ``P_n`` (L, C*kh*kw). The CPU kernel forms one sample's at a time per thread (patch
    rows copied into a buffer of the thread, one BLAS product, squares added to the thread's sums),
    so nothing of size N x weight exists and the work splits over threads by samples; on layers
    with few output positions that is 1.2-3.5x faster than the grouped weight-gradient convolution
    the reference runs (``bench/bench_ops.py``). The CUDA kernel copies patch rows of a chunk of
    samples, multiplies them with one batched product (cuBLAS) and adds the squares.

    Args:
        x: the convolution's input ``(N, C, H, W)``, float32 or float64.
        g: the loss gradient of its output ``(N, Co, Ho, Wo)``, same dtype and device.
        kernel_size, stride, padding, dilation: pairs of ints, as in ``nn.Conv2d``.

    Returns:
        ``(Co, C, kh, kw)`` in the dtype of ``x``.

    Raises:
        TypeError: non-tensors, unsupported or different dtypes, malformed pairs.
        ValueError: shapes that do not fit the convolution, devices differ.
        RuntimeError: ``x`` or ``g`` requires grad with grad mode on (the op has no derivative: OBD
            takes it of detached tensors; pass ``x.detach()``).

    Example:
        >>> import torch, pyobc.ops
        >>> x, g = torch.randn(4, 3, 8, 8), torch.randn(4, 5, 8, 8)
        >>> s = pyobc.ops.conv2d_sq_grad_sums(x, g, (3, 3), (1, 1), (1, 1), (1, 1))
        >>> per_sample = torch.stack([torch.nn.grad.conv2d_weight(x[i:i + 1], (5, 3, 3, 3), g[i:i + 1], padding=1)
        ...                           for i in range(4)])
        >>> torch.allclose(s, per_sample.square().sum(0), rtol=1e-4)
        True
    """
    pairs = (kernel_size, stride, padding, dilation)
    if not all(isinstance(v, (list, tuple)) for v in pairs):
        check_conv2d_sq_grad_sums(x, g, *pairs)  # raises the TypeError
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, g)):
        raise RuntimeError("conv2d_sq_grad_sums is not differentiable: pass detached tensors (x.detach(), "
                           "g.detach())")
    return _registry.call(torch.ops.pyobc.conv2d_sq_grad_sums.default, (x, g, *map(list, pairs)), (x, g),
                          lambda: check_conv2d_sq_grad_sums(x, g, *pairs))


def backend_report() -> dict:
    """Which implementation serves each op, and the state of the compiled library.

    Returns a dict::

        {"extension": {"status": "loaded" | "disabled" | "failed",
                       "error": str | None,        # why it did not load
                       "path": str | None,         # the loaded shared library
                       "cuda_kernels": bool},      # built with CUDA kernels
         "cuda_available": bool,                   # torch.cuda.is_available()
         "ops": {"channel_dot": {"cpu": "compiled" | "reference" | "unavailable",
                                 "cuda": "compiled" | "reference" | "unavailable",
                                 "schema": str | None,
                                 "error": str}, ...}}    # only if it could not be registered

    ``"reference"`` means the pure-PyTorch kernel serves that device (no compiled library, or a
    CPU-only build for "cuda"); ``"unavailable"`` means the op could not be registered at all.

    Example:
        >>> import pyobc.ops
        >>> pyobc.ops.backend_report()["ops"]["channel_dot"]["cpu"] in ("compiled", "reference")
        True
    """
    return _registry.backend_report()
