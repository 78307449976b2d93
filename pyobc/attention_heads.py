"""Attention modules whose head layout lives in plain ``int`` attributes, found by their attributes.

``nn.MultiheadAttention`` derives its head width from its parameter shapes, and pyobc cuts it
head-uniformly (see :mod:`pyobc.pruning.slicing`). Most other attention implementations (timm's
``Attention``, torchvision's Swin, Hugging Face's ``BertSelfAttention`` / ``LlamaAttention`` /
``GPT2Attention``, mobilevit, efficientvit, LeViT...) keep ``num_heads``, ``head_dim`` or split sizes as
integers and reshape with them: cutting their query/key/value or output-projection widths (or the
embedding width those projections read, which several of them reshape with) breaks the forward pass.
pyobc leaves those widths alone: :func:`attention_layers` names every weight layer inside such a module's
projections so that :func:`pyobc.grouping.build_groups` can keep their groups out of pruning (and say so).

Whole heads are pruned where the layout is timm's fused ``Attention`` (:func:`fused_head_layout`: ``qkv``
and ``proj`` linear layers, ``num_heads``, ``head_dim`` and ``attn_dim = num_heads * head_dim`` as ints, no
gate, no norm over ``attn_dim``): a group per module whose channels are its heads, removing each head's
query, key and value rows of ``qkv`` and its columns of ``proj`` and lowering ``num_heads``/``attn_dim``.

A module is an attention module here when it is not ``nn.MultiheadAttention``, has a positive ``int``
attribute naming a head count or width (:data:`HEAD_ATTRIBUTES`), and has a child named like a query /
key / value projection (:data:`QKV_NAMES`). Its protected layers are the weight layers inside those
children and inside its output-projection children (:data:`OUT_NAMES`).

Example:
    >>> import torch.nn as nn
    >>> class Attention(nn.Module):
    ...     def __init__(self, dim=8, num_heads=2):
    ...         super().__init__()
    ...         self.num_heads, self.head_dim = num_heads, dim // num_heads
    ...         self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    >>> block = nn.Sequential(Attention(), nn.Linear(8, 8))
    >>> attention_layers(block)
    {'0.qkv': '0', '0.proj': '0'}
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from .layers import CONV, is_prunable_layer

__all__ = ["HEAD_ATTRIBUTES", "QKV_NAMES", "OUT_NAMES", "WIDTH_ATTRIBUTES", "is_attention_module", "attention_layers",
           "int_width_layers", "HeadLayout",
           "fused_head_layout", "head_layouts"]

#: integer attributes that carry a head count or a head width
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "head_dim",
                   "attention_head_size", "num_key_value_heads", "num_key_value_groups", "key_dim", "embed_dim")
#: child names of query / key / value projections (fused or separate)
QKV_NAMES = frozenset({"qkv", "qkv_proj", "c_attn", "in_proj", "Wqkv", "q", "k", "v", "kv", "q_proj", "k_proj",
                       "v_proj", "kv_proj", "query", "key", "value"})
#: child names of output projections
OUT_NAMES = frozenset({"proj", "o_proj", "out_proj", "c_proj", "o", "dense"})


#: integer attributes that carry a model's embedding width (torchvision's VisionTransformer reshapes its
#: patch embedding with ``hidden_dim``)
WIDTH_ATTRIBUTES = ("hidden_dim", "embed_dim", "d_model", "hidden_size")


def _has_head_attribute(module: nn.Module) -> bool:
    for attr in HEAD_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return True
    return False


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module with its head layout in ``int`` attributes.

    Example:
        >>> import torch.nn as nn
        >>> is_attention_module(nn.MultiheadAttention(8, 2))  # pyobc cuts it head-uniformly
        False
    """
    if isinstance(module, nn.MultiheadAttention) or not _has_head_attribute(module):
        return False
    return any(name in QKV_NAMES for name, _ in module.named_children())


def attention_layers(model: nn.Module) -> dict[str, str]:
    """Qualified names of the weight layers inside attention projections -> the attention module's name.

    Example:
        >>> import torch.nn as nn
        >>> attention_layers(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not is_attention_module(module):
            continue
        for child_name, child in module.named_children():
            if child_name not in QKV_NAMES | OUT_NAMES:
                continue
            prefix = f"{name}.{child_name}" if name else child_name
            for sub_name, sub in child.named_modules():
                if is_prunable_layer(sub):
                    out.setdefault(f"{prefix}.{sub_name}" if sub_name else prefix, name)
    return out


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one fused attention module live: ``qkv`` rows ``[k * num_heads * head_dim +
    h * head_dim, ... + head_dim)`` for q, k, v (``k`` = 0, 1, 2) and ``proj`` columns ``[h * head_dim, ...)``
    belong to head ``h``."""

    module: str
    qkv: str
    proj: str
    num_heads: int
    head_dim: int


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def fused_head_layout(module: nn.Module) -> tuple[int, int] | None:
    """``(num_heads, head_dim)`` when ``module`` has timm's fused attention layout (see the module
    docstring), else None.

    Example:
        >>> import torch.nn as nn
        >>> class Attention(nn.Module):
        ...     def __init__(self, dim=8, num_heads=2):
        ...         super().__init__()
        ...         self.num_heads, self.head_dim, self.attn_dim = num_heads, dim // num_heads, dim
        ...         self.qkv, self.proj, self.norm = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Identity()
        >>> fused_head_layout(Attention()), fused_head_layout(nn.Linear(2, 2))
        ((2, 4), None)
    """
    heads, dim, width = (getattr(module, a, None) for a in ("num_heads", "head_dim", "attn_dim"))
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (_int(heads) and _int(dim) and _int(width) and width == heads * dim):
        return None
    if type(qkv) is not nn.Linear or type(proj) is not nn.Linear:
        return None
    if qkv.out_features != 3 * width or proj.in_features != width or getattr(module, "gate", None) is not None:
        return None
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return None
    return int(heads), int(dim)


def head_layouts(model: nn.Module) -> list[HeadLayout]:
    """The :class:`HeadLayout` of every attention module of ``model`` that :func:`fused_head_layout` accepts.

    Example:
        >>> import torch.nn as nn
        >>> head_layouts(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    out = []
    for name, module in model.named_modules():
        layout = fused_head_layout(module)
        if layout is not None and is_attention_module(module):
            prefix = f"{name}." if name else ""
            out.append(HeadLayout(name, prefix + "qkv", prefix + "proj", *layout))
    return out


def int_width_layers(model: nn.Module) -> dict[str, str]:
    """Convolutions whose out-channel count a parent module keeps as an ``int`` (:data:`WIDTH_ATTRIBUTES`)
    and may reshape with, like torchvision's ``VisionTransformer.conv_proj`` (a patch embedding reshaped
    to tokens with ``hidden_dim``): name -> the parent.

    Example:
        >>> import torch.nn as nn
        >>> class Patchify(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hidden_dim, self.conv_proj = 8, nn.Conv2d(3, 8, 4, stride=4)
        >>> int_width_layers(nn.Sequential(Patchify()))
        {'0.conv_proj': '0'}
    """
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # pyobc cuts it and updates its embed_dim
            continue
        widths = {getattr(module, a, None) for a in WIDTH_ATTRIBUTES} - {None}
        widths = {w for w in widths if _int(w)}
        if not widths:
            continue
        for child_name, child in module.named_children():
            if isinstance(child, CONV) and child.out_channels in widths:
                out.setdefault(f"{name}.{child_name}" if name else child_name, name)
    return out

