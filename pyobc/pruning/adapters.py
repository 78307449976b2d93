"""The adapter module of Equivalent Pruning, on its own so that modules that only need to *recognise*
adapters (:mod:`~pyobc.pruning.plan` refuses to save a model that still has them) do not depend on
:mod:`~pyobc.pruning.equivalent`, which itself builds on :mod:`~pyobc.pruning.plan`.

Example:
    >>> import torch, torch.nn as nn
    >>> m = OBCAdapted(nn.Linear(3, 4), post=nn.Linear(4, 2, bias=False))
    >>> m(torch.randn(5, 3)).shape
    torch.Size([5, 2])
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["OBCAdapted"]


class OBCAdapted(nn.Module):
    """``post(layer(pre(x)))``: a conv/linear ``layer`` with an optional input map ``pre`` (D) and output
    map ``post`` (C), both bias-free 1x1 convs or linear layers over the channel dimension."""

    def __init__(self, layer: nn.Module, pre: nn.Module | None = None, post: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.pre = pre
        self.post = post

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        y = self.layer(x, *args, **kwargs)
        if self.post is not None:
            y = self.post(y)
        return y
