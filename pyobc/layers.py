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
           "is_weight_layer"]

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


def is_weight_layer(module: nn.Module) -> bool:
    """A linear layer or a (non-transposed) convolution: the layers that own out/in channels."""
    return isinstance(module, LINEAR) or (isinstance(module, CONV) and not module.transposed)
