"""The kinds of layers pyobc knows, in one place: which modules are convolutions, linear maps, norms.

Every other module asks these tuples and predicates instead of spelling out its own list of classes,
so supporting a new layer type (or fixing how one is recognised) is a change here.

Example:
    >>> import torch.nn as nn
    >>> from pyobc.layers import CONV, NORMS, is_weight_layer
    >>> isinstance(nn.Conv1d(2, 3, 1), CONV), isinstance(nn.LayerNorm(4), NORMS)
    (True, True)
    >>> is_weight_layer(nn.ConvTranspose2d(2, 3, 1)), is_weight_layer(nn.Linear(2, 3))
    (False, True)
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["CONV", "LINEAR", "WEIGHT_LAYERS", "BATCH_NORMS", "INSTANCE_NORMS", "STATISTICS_NORMS", "NORMS",
           "is_weight_layer", "is_transposed_linear", "is_prunable_layer", "is_grouped_conv", "is_norm_layer"]

#: every convolution (``Conv1d/2d/3d`` and the transposed ones; check ``.transposed`` where it matters)
CONV = (nn.modules.conv._ConvNd,)
#: dense layers ``y = x Wᵀ + b``
LINEAR = (nn.Linear,)
#: layers whose weight maps input channels to output channels (conv or linear)
WEIGHT_LAYERS = LINEAR + CONV
#: ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
#: ``InstanceNorm1d/2d/3d``
INSTANCE_NORMS = (nn.modules.instancenorm._InstanceNorm,)
#: channel norms of (N, C, ...) tensors whose affine parameters are indexed by the channel axis 1
STATISTICS_NORMS = BATCH_NORMS + (nn.GroupNorm,) + INSTANCE_NORMS
#: every normalisation layer with per-channel affine parameters
NORMS = STATISTICS_NORMS + (nn.LayerNorm,)


def is_norm_layer(module: nn.Module) -> bool:
    """A normalisation layer: one of :data:`NORMS`, ``nn.RMSNorm``, or a module of another library whose
    class name ends in ``RMSNorm`` / ``LayerNorm`` and that holds only 1-D parameters of its own (Hugging
    Face's ``LlamaRMSNorm``, ``Qwen3RMSNorm``, timm's ``LayerNorm2d``..., and their subclasses). OBA's inter-layer Hessian
    direction is 0 on their parameters.

    Example:
        >>> import torch.nn as nn
        >>> class LlamaRMSNorm(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(4))
        >>> import torch
        >>> is_norm_layer(LlamaRMSNorm()), is_norm_layer(nn.RMSNorm(4)), is_norm_layer(nn.Linear(2, 2))
        (True, True, False)
    """
    if isinstance(module, NORMS + (nn.RMSNorm,)):
        return True
    params = list(module.parameters(recurse=False))
    named = any(c.__name__.endswith(("RMSNorm", "LayerNorm")) for c in type(module).__mro__)
    return (named and bool(params)
            and all(p.dim() == 1 for p in params) and not list(module.children()))


def is_weight_layer(module: nn.Module) -> bool:
    """A linear layer or a (non-transposed) convolution: the layers that own out/in channels."""
    return isinstance(module, LINEAR) or (isinstance(module, CONV) and not module.transposed)


def is_transposed_linear(module: nn.Module) -> bool:
    """A dense layer that stores its weight as ``(in, out)`` and computes ``y = x W + b``: Hugging Face's
    ``Conv1D`` (GPT-2, GPT, CTRL...), recognised by its class name and attributes (``nf`` outputs,
    ``nx`` inputs) so that pyobc never imports transformers.

    Its output channels are axis 1 of the weight and its input channels axis 0.

    Example:
        >>> import torch, torch.nn as nn
        >>> class Conv1D(nn.Module):  # the shape of transformers.pytorch_utils.Conv1D
        ...     def __init__(self, nf, nx):
        ...         super().__init__()
        ...         self.nf, self.nx = nf, nx
        ...         self.weight = nn.Parameter(torch.zeros(nx, nf))
        ...         self.bias = nn.Parameter(torch.zeros(nf))
        >>> is_transposed_linear(Conv1D(3, 2)), is_transposed_linear(nn.Linear(2, 3))
        (True, False)
    """
    if type(module).__name__ != "Conv1D" or not isinstance(getattr(module, "nf", None), int):
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, nn.Parameter) and w.dim() == 2 and tuple(w.shape) == (module.nx, module.nf)


def is_prunable_layer(module: nn.Module) -> bool:
    """A layer whose out-channels pyobc can prune: :func:`is_weight_layer` or :func:`is_transposed_linear`.

    Example:
        >>> import torch.nn as nn
        >>> is_prunable_layer(nn.Conv2d(2, 4, 3)), is_prunable_layer(nn.LayerNorm(4))
        (True, False)
    """
    return is_weight_layer(module) or is_transposed_linear(module)


def is_grouped_conv(module: nn.Module) -> bool:
    """A convolution with ``1 < groups`` that is not depthwise (``groups`` differs from its in-channels).

    Example:
        >>> import torch.nn as nn
        >>> is_grouped_conv(nn.Conv2d(8, 8, 3, groups=2)), is_grouped_conv(nn.Conv2d(8, 8, 3, groups=8))
        (True, False)
    """
    return isinstance(module, CONV) and module.groups > 1 and module.groups != module.in_channels
