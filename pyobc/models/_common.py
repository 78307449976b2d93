"""Small helpers shared by the model builders."""
from __future__ import annotations

import math

from torch import nn


def check_common(num_classes, in_channels, input_size) -> None:
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest int, at least 1."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0 or not math.isfinite(width):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return max(1, int(round(channels * width)))


def kaiming_init(module: nn.Module) -> None:
    """He-normal (fan_out) convolutions, unit/zero norms, and a small normal for linear layers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))  # PyTorch's default, made explicit
            if m.bias is not None:
                fan_in = m.weight.shape[1]
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound)
