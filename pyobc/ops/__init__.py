"""Fused channel reductions used by pyobc's scoring hot paths.

Every op is a ``torch.ops.pyobc.*`` operator: compiled C++/CUDA kernels (``pyobc._C``, PyTorch
stable ABI) when the extension is built, pure-PyTorch reference kernels otherwise, with the same
schema, Python API, autograd formulas and ``torch.compile`` support either way.
:func:`backend_report` says which implementation serves which device.

Environment: ``PYOBC_DISABLE_EXT=1`` skips the compiled library (reference kernels only, no
warning). When the library exists but fails to load, importing this module emits one
``RuntimeWarning`` with the reason.

Memory layout: contiguous inputs, channels_last (and channels_last_3d) inputs and any other dense
permutation of a contiguous tensor (e.g. a transpose) are read in place, provided both inputs
share strides (and, for ``per_sample=True`` and for weights, dim 0 is outermost in memory). Any
other layout (slices with gaps, broadcast/expanded tensors, inputs with different strides) is
first copied to a contiguous tensor, which costs one full-size temporary per input.

The compiled ops cost about 5 us of fixed overhead per call in C++ plus about 10 us for the
Python-level autograd registration; they pay off from a few thousand elements up.
"""
from __future__ import annotations

import torch

from . import _registry
from ._meta import check_channel_dot, check_weight_channel_sums

__all__ = ["channel_dot", "weight_channel_sums", "backend_report"]

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
    check_channel_dot(a, b, dim, per_sample)
    return torch.ops.pyobc.channel_dot.default(a, b, dim, per_sample)


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
    check_weight_channel_sums(w, t, groups)
    return torch.ops.pyobc.weight_channel_sums.default(w, t, groups)


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
