"""A plain multilayer perceptron on flattened images."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_common, kaiming_init, scaled

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """flatten -> Linear -> ReLU -> ... -> Linear(hidden[-1], num_classes).

    ``self.layers`` is an ``nn.Sequential`` of alternating Linear and ReLU modules.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        hidden: Sequence[int] = (256, 128),
    ):
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        hidden = tuple(hidden)
        for h in hidden:
            if isinstance(h, bool) or not isinstance(h, int) or h < 1:
                raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        self.input_size = input_size
        layers: list[nn.Module] = []
        features = in_channels * input_size * input_size
        for h in hidden:
            layers += [nn.Linear(features, h), nn.ReLU()]
            features = h
        layers.append(nn.Linear(features, num_classes))
        self.layers = nn.Sequential(*layers)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


def mlp(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    hidden: Sequence[int] = (256, 128),
    width: float | None = None,
) -> MLP:
    """MLP with hidden sizes ``hidden`` (each scaled by ``width`` when given)."""
    if width is not None:
        hidden = tuple(scaled(h, width) for h in hidden)
    return MLP(num_classes, in_channels, input_size, hidden)
