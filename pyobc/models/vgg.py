"""VGG with batch normalisation (Simonyan & Zisserman, 2015), CIFAR-style.

Configurations A (VGG-11), D (VGG-16) and E (VGG-19) of 3x3 conv + BN + ReLU stacks. A max-pooling
layer is left out whenever it would shrink the feature map below 1x1, so 8x8 and 16x16 inputs
work. The head is AdaptiveAvgPool2d(1), flatten, Linear(512w, 512w), ReLU, Linear(512w, classes),
with every channel count scaled by the width multiplier ``w``.
"""
from __future__ import annotations

import torch
from torch import nn

from ._common import check_common, kaiming_init, scaled

__all__ = ["CONFIGS", "VGG", "vgg11", "vgg16", "vgg19"]

CONFIGS = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    def __init__(
        self,
        config: str,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        width: float = 1.0,
    ):
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {config!r}")
        self.input_size = input_size
        layers: list[nn.Module] = []
        channels, size = in_channels, input_size
        for item in CONFIGS[config]:
            if item == "M":
                if size // 2 >= 1:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    size //= 2
                continue
            out = scaled(item, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg11(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> VGG:
    """VGG-11 with BN (configuration A)."""
    return VGG("A", num_classes, in_channels, input_size, width)


def vgg16(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> VGG:
    """VGG-16 with BN (configuration D)."""
    return VGG("D", num_classes, in_channels, input_size, width)


def vgg19(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> VGG:
    """VGG-19 with BN (configuration E)."""
    return VGG("E", num_classes, in_channels, input_size, width)
