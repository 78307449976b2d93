"""CIFAR-style residual networks (He et al., "Deep Residual Learning for Image Recognition", 2016).

Depth 6n + 2: a 3x3 stem convolution with 16 channels, three stages of n basic blocks with 16, 32
and 64 channels (times ``width``), stride 2 at the first block of stages 2 and 3, a projection
shortcut (1x1 convolution + BN, "option B") wherever the shape changes, global average pooling and
a linear classifier. ResNet-20/32/56 use n = 3/5/9.
"""
from __future__ import annotations

import torch
from torch import nn

from ._common import check_common, kaiming_init, scaled

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (no in-place ops)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        width: float = 1.0,
    ):
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        if isinstance(blocks_per_stage, bool) or not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be a positive int, got {blocks_per_stage!r}")
        self.input_size = input_size
        widths = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            layers = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, about 0.27M parameters at width 1)."""
    return CifarResNet(3, num_classes, in_channels, input_size, width)


def resnet32(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, about 0.47M parameters at width 1)."""
    return CifarResNet(5, num_classes, in_channels, input_size, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, about 0.86M parameters at width 1)."""
    return CifarResNet(9, num_classes, in_channels, input_size, width)
