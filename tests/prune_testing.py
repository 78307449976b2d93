"""Shared helpers of the pruning tests (small zoo models, consistency checks); no tests of its own, so it is
not named ``test_*`` (pytest would collect it as a test module)."""
from __future__ import annotations

import torch
import torch.nn as nn

import pyobc
from pyobc.layers import BATCH_NORMS, CONV

#: name -> builder kwargs: small widths, 8x8 single-channel inputs
ZOO = {
    "resnet20": dict(width=0.25),
    "resnet32": dict(width=0.25),
    "resnet56": dict(width=0.125),
    "vgg11": dict(width=0.125),
    "vgg16": dict(width=0.125),
    "vgg19": dict(width=0.0625),
    "mlp": dict(hidden=(16, 12)),
    "vit_tiny": dict(embed_dim=16, depth=2, num_heads=2),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A zoo model in eval mode with random BatchNorm statistics and affine parameters (so that zeroing
    a channel's BN is not the identity of an untrained network)."""
    torch.manual_seed(seed)
    model = pyobc.models.get(name, in_channels=1, input_size=8, **ZOO[name]).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCH_NORMS):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(std=0.1)
        for name_, p in model.named_parameters():
            if name_.endswith(("pos_embed", "cls_token")):
                p.normal_(std=0.5)
    return model


def inputs(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g)


def assert_consistent(model: nn.Module) -> None:
    """Every module's size attributes agree with its (pruned) parameters and buffers."""
    for name, m in model.named_modules():
        if isinstance(m, CONV):
            assert m.out_channels == m.weight.shape[0], name
            assert m.in_channels == m.weight.shape[1] * m.groups, name
            if m.bias is not None:
                assert m.bias.shape[0] == m.out_channels, name
        elif isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
            if m.bias is not None:
                assert m.bias.shape[0] == m.out_features, name
        elif isinstance(m, BATCH_NORMS):
            assert m.num_features == m.weight.shape[0] == m.running_mean.shape[0] == m.running_var.shape[0], name
        elif isinstance(m, nn.LayerNorm):
            assert tuple(m.normalized_shape) == tuple(m.weight.shape), name
        elif isinstance(m, nn.MultiheadAttention):
            assert m.embed_dim == m.in_proj_weight.shape[0] // 3 == m.out_proj.weight.shape[1], name
            assert m.head_dim * m.num_heads == m.embed_dim, name
            assert m.kdim == m.vdim == m.in_proj_weight.shape[1], name
            assert m.out_proj.in_features == m.embed_dim, name
            assert m.out_proj.out_features == m.out_proj.weight.shape[0], name


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
