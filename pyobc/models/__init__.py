"""pyobc's model zoo: small reference networks, and versions of them trained on the digits data.

Builders (all take ``num_classes=10, in_channels=3, input_size=32`` and a ``width`` multiplier,
and return an ``nn.Module`` mapping (N, in_channels, input_size, input_size) images to logits):
``resnet20``, ``resnet32``, ``resnet56`` (CIFAR ResNets, projection shortcuts), ``vgg11``,
``vgg16``, ``vgg19`` (with BN), ``mlp`` and ``vit_tiny``. They use only plain layers and no
in-place operations, so activation hooks and Torch-Pruning's dependency graph work on them.

Example:
    >>> from pyobc import models
    >>> net = models.get("resnet20", in_channels=1, input_size=16)
    >>> model = models.trained("resnet20", image_size=16, channels=1)   # trains once, then cached
    >>> model.test_accuracy                                              # doctest: +SKIP
    0.97...

``train`` and ``evaluate`` are generic helpers (any model, any ``(x, y)`` loader) that pyobc
also uses for fine-tuning.
"""
from __future__ import annotations

from .mlp import MLP, mlp
from .resnet import BasicBlock, CifarResNet, resnet20, resnet32, resnet56
from .training import RandomShift, default_param_groups, evaluate, train
from .vgg import VGG, vgg11, vgg16, vgg19
from .vit import VisionTransformer, vit_tiny
from .zoo import RECIPES, ZOO_VERSION, TrainedInfo, get, names, trained, trained_info

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "MLP",
    "RECIPES",
    "RandomShift",
    "TrainedInfo",
    "VGG",
    "VisionTransformer",
    "ZOO_VERSION",
    "default_param_groups",
    "evaluate",
    "get",
    "mlp",
    "names",
    "resnet20",
    "resnet32",
    "resnet56",
    "train",
    "trained",
    "trained_info",
    "vgg11",
    "vgg16",
    "vgg19",
    "vit_tiny",
]
