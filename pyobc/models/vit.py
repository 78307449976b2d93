"""A tiny Vision Transformer (Dosovitskiy et al., 2021) for small images.

Patch embedding by a Conv2d with kernel = stride = patch size, a learnable class token and
position embedding, ``depth`` pre-norm blocks (LayerNorm -> nn.MultiheadAttention -> residual;
LayerNorm -> Linear -> GELU -> Linear -> residual), a final LayerNorm and a linear head on the
class token. Residual adds are out of place (``x = x + ...``).
"""
from __future__ import annotations

import torch
from torch import nn

from ._common import check_common, scaled

__all__ = ["Block", "VisionTransformer", "vit_tiny", "default_patch_size"]


def default_patch_size(input_size: int) -> int:
    """4 where that leaves at least 4x4 patches (inputs of 16 and more), else 2, else 1.

    32 -> 4 (64 patches), 16 -> 4 (16 patches), 8 -> 2 (16 patches). Only sizes that the patch
    divides are considered.
    """
    for p in (4, 2):
        if input_size % p == 0 and input_size // p >= 4:
            return p
    return 1


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = max(1, int(round(embed_dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        patch_size: int | None = None,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        if patch_size is None:
            patch_size = default_patch_size(input_size)
        for name, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if input_size % patch_size != 0:
            raise ValueError(f"patch_size {patch_size} must divide input_size {input_size}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
        # patch embedding: like a linear layer over the flattened patch
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (N, D, H', W')
        x = torch.flatten(x, 2).transpose(1, 2)  # (N, P, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit_tiny(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    patch_size: int | None = None,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    width: float | None = None,
) -> VisionTransformer:
    """Tiny ViT; ``width`` (if given) scales ``embed_dim`` (kept a multiple of ``num_heads``)."""
    if width is not None:
        embed_dim = max(num_heads, int(round(scaled(embed_dim, width) / num_heads)) * num_heads)
    return VisionTransformer(num_classes, in_channels, input_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
