"""OBA's two implementations agree on real architectures.

``ad="forward"`` (forward-over-reverse: unit gates returning views or copies where an in-place op
writes, dual-aware convolution/batch-norm backwards, elementary SiLU/Mish/hardsigmoid under forward mode)
against ``ad="reverse"`` (two reverse passes), raw member sums, on models whose forward uses what the
forward path has to get right: torchvision's ``ReLU(inplace=True)`` and ``out += identity`` (ResNet),
hardswish/hardsigmoid squeeze-excitation (MobileNetV3), SiLU and stochastic depth (EfficientNet),
concatenation (DenseNet), LayerNorm2d (ConvNeXt, whose ``auto`` choice is reverse), and attention with
RMSNorm and rotary embeddings (Llama). Measured on all 21 architectures of tests/real_models.py: at most
4e-6 of the largest score apart (float32).
"""
from __future__ import annotations

import pytest
import torch

import pyobc
from real_models import ARCHS, build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v3_small", "tv_efficientnet_b0",
                                  "tv_densenet121", "tv_convnext_tiny", "hf_llama"])
@pytest.mark.parametrize("hessian", ["inter-layer", "full"])
def test_forward_and_reverse_over_reverse_agree(name, hessian):
    model, batch = build(name, 2)
    kw = dict(loss_fn=ARCHS[name].loss_fn, hessian=hessian, normalize="none", group_reduction="sum")
    fwd = pyobc.score(model, [batch], "oba", ad="forward", **kw)
    rev = pyobc.score(model, [batch], "oba", ad="reverse", **kw)
    a = torch.cat([v.flatten() for v in fwd.values]).double()
    b = torch.cat([v.flatten() for v in rev.values]).double()
    assert a.numel() == b.numel() > 0 and bool(b.abs().max() > 0)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4
