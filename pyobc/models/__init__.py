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

Language models (Hugging Face transformers, an optional dependency imported on first use):
``tiny_llama`` builds a tiny Llama (grouped-query attention) over pyobc's byte vocabulary, and
``trained_lm("tiny-llama")`` trains it once on the text corpus of :mod:`pyobc.corpus` (cached).
"""
from __future__ import annotations

from .lm import LM_RECIPES, LM_VERSION, LMTrainedInfo, lm_names, tiny_llama, trained_lm
from .mlp import MLP, mlp
from .resnet import BasicBlock, CifarResNet, resnet20, resnet32, resnet56
from .training import RandomShift, default_param_groups, evaluate, train
from .vgg import VGG, vgg11, vgg16, vgg19
from .vit import VisionTransformer, vit_tiny
from .zoo import RECIPES, ZOO_VERSION, TrainedInfo, get, names, trained, trained_info

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "LMTrainedInfo",
    "LM_RECIPES",
    "LM_VERSION",
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
    "lm_names",
    "mlp",
    "names",
    "resnet20",
    "resnet32",
    "resnet56",
    "tiny_llama",
    "train",
    "trained",
    "trained_info",
    "trained_lm",
    "vgg11",
    "vgg16",
    "vgg19",
    "vit_tiny",
]
