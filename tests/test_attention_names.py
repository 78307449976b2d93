"""Attention modules found by their children's names and their int attributes, on layouts beyond the
Hugging Face ones: CrossViT's cross-attention (``wq``/``wk``/``wv``), list-valued width attributes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
from pyobc.attention_heads import attention_layers, head_layouts, int_width_layers


class CrossAttention(nn.Module):
    """timm's CrossViT cross-attention: the class token queries every token; reshapes with ``num_heads``."""

    def __init__(self, dim: int = 8, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.wq, self.wk, self.wv, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        q = self.wq(x[:, :1]).reshape(b, 1, self.num_heads, c // self.num_heads).transpose(1, 2)
        k = self.wk(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        v = self.wv(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        a = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, 1, c))


class CrossNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_dim, self.num_heads = [8, 8], [2, 2]  # one per branch, as CrossViT keeps them
        self.inp = nn.Linear(4, 8)
        self.attn = CrossAttention()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.attn(self.inp(x))[:, 0]
        return self.fc2(F.relu(self.fc1(h)))


def test_cross_attention_widths_stay_and_the_mlp_is_cut():
    torch.manual_seed(0)
    model = CrossNet().eval()
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4,))
    assert int_width_layers(model) == {}  # list-valued widths are not widths pyobc reads (and no error)
    assert set(attention_layers(model)) == {"attn.wq", "attn.wk", "attn.wv", "attn.proj"}
    with pytest.warns(UserWarning, match="left whole.*attn"):
        scores = pyobc.score(model, [(x, y)], "jacobian")
    pruned, _ = pyobc.prune(model, scores, 0.5, scope="local", example_inputs=x)
    assert {n: p.shape for n, p in pruned.attn.named_parameters()} == \
        {n: p.shape for n, p in model.attn.named_parameters()}
    assert pruned.fc1.out_features == 8 and pruned(x).shape == (4, 3)


def test_a_list_valued_head_attribute_inside_a_known_attention_is_ignored():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim, self.num_key_value_groups = 4, 2
            self.q_proj, self.o_proj = nn.Linear(8, 16), nn.Linear(16, 8)
            self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
            self.rotary = nn.Module()
            self.rotary.num_heads = [4, 2]  # not a count of this module's heads

    layouts = head_layouts(nn.Sequential(Attention()))
    assert [(h.num_heads, h.num_kv_heads, h.head_dim) for h in layouts] == [(4, 2, 4)]
