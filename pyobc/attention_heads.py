"""Attention modules whose head layout lives in plain ``int`` attributes, found by their attributes.

``nn.MultiheadAttention`` derives its head width from its parameter shapes, and pyobc cuts it
head-uniformly (see :mod:`pyobc.pruning.slicing`). Most other attention implementations (timm's
``Attention``, torchvision's Swin, Hugging Face's ``BertSelfAttention`` / ``LlamaAttention`` /
``GPT2Attention``, mobilevit, efficientvit, LeViT...) keep ``num_heads``, ``head_dim`` or split sizes as
integers and reshape with them: cutting their query/key/value or output-projection widths (or the
embedding width those projections read, which several of them reshape with) breaks the forward pass.
pyobc leaves those widths alone: :func:`attention_layers` names every weight layer inside such a module's
projections so that :func:`pyobc.grouping.build_groups` can keep their groups out of pruning (and say so).

Whole heads are pruned where pyobc knows the layout (:func:`head_layouts`, one :class:`HeadLayout` per
module, see :func:`head_family`): timm's fused ``Attention`` (``qkv``/``proj``, ``num_heads``, ``head_dim``,
``attn_dim``); Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma / Phi (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` or Phi's ``dense``, ``head_dim``, grouped-query attention through ``num_key_value_groups``); BERT
(``query``/``key``/``value`` and the sibling ``output.dense``); GPT-2 (``Conv1D`` ``c_attn``/``c_proj``,
``split_size``). Those modules get a group whose channels are whole heads
(:func:`pyobc.grouping.build_groups`), and :func:`sync_heads` sets their head attributes from the cut widths;
``head_dim`` never changes, so rotary embeddings stay valid. Modules with parts per head outside their
projections (OLMo-2's norm over all query heads, StableLM's list of per-head norms) keep their heads.

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

from .layers import CONV, is_prunable_layer, is_transposed_linear

__all__ = ["HEAD_ATTRIBUTES", "QKV_NAMES", "OUT_NAMES", "WIDTH_ATTRIBUTES", "is_attention_module", "attention_layers",
           "int_width_layers", "HeadLayout", "fused_head_layout", "head_family", "head_layouts", "sync_heads"]

#: integer attributes that carry a head count or a head width
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "head_dim",
                   "attention_head_size", "num_key_value_heads", "num_key_value_groups", "key_dim", "embed_dim")
#: child names of query / key / value projections (fused or separate)
QKV_NAMES = frozenset({"qkv", "qkv_proj", "c_attn", "in_proj", "Wqkv", "q", "k", "v", "kv", "q_proj", "k_proj",
                       "v_proj", "kv_proj", "query", "key", "value", "query_key_value", "wq", "wk", "wv",
                       "to_q", "to_k", "to_v", "to_kv", "to_qkv"})
#: child names of output projections
OUT_NAMES = frozenset({"proj", "o_proj", "out_proj", "c_proj", "o", "dense", "wo", "to_out"})


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
    """Where the heads of one attention module live.

    ``q``, ``k`` and ``v`` name the layers whose output rows hold the query, key and value heads (the
    same name three times when they are fused, rows ``[q | k | v]``); ``out`` names the output projection,
    whose input columns hold the query heads. Query head ``h`` uses key/value head ``h // (num_heads //
    num_kv_heads)`` (grouped-query attention; ``num_kv_heads == num_heads`` without it). ``family`` says
    which module attributes follow a cut (:func:`sync_heads`): ``fused`` (timm's ``Attention``),
    ``separate`` (Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Phi... ``q_proj``...``o_proj``/``dense``),
    ``bert`` (``query``/``key``/``value``, with the output projection in the sibling ``output.dense``), ``gpt2``
    (``Conv1D`` ``c_attn``/``c_proj``).
    """

    module: str
    family: str
    q: str
    k: str
    v: str
    out: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def row_offsets(self) -> tuple[int, int, int]:
        """Where the q, k and v rows start in their layers (non-zero only for fused layers)."""
        if self.q != self.k:
            return 0, 0, 0
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 0, q_width, q_width + kv_width


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


def head_family(module: nn.Module) -> str | None:
    """The :class:`HeadLayout` family of ``module`` from its children and attributes (not from its widths,
    which a cut changes before :func:`sync_heads` runs), or None.

    Example:
        >>> import torch.nn as nn
        >>> class Attention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head_dim, self.num_key_value_groups = 4, 2
        ...         self.q_proj, self.o_proj = nn.Linear(8, 16), nn.Linear(16, 8)
        ...         self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        >>> head_family(Attention()), head_family(nn.Linear(2, 2))
        ('separate', None)
    """
    if isinstance(module, nn.MultiheadAttention) or list(module.parameters(recurse=False)):
        return None  # per-head parameters of the module itself (attention sinks...) would not follow a cut
    kids = dict(module.named_children())
    linear = (lambda *names: all(type(kids.get(n)) is nn.Linear for n in names))
    if (linear("q_proj", "k_proj", "v_proj") and _separate_out(module) is not None
            and _int(getattr(module, "head_dim", None))):
        return "separate"
    if linear("query", "key", "value") and _int(getattr(module, "attention_head_size", None)) \
            and _int(getattr(module, "num_attention_heads", None)):
        return "bert"
    if (all(is_transposed_linear(kids.get(n)) for n in ("c_attn", "c_proj")) and "q_attn" not in kids
            and all(_int(getattr(module, a, None)) for a in ("num_heads", "head_dim", "split_size"))):
        return "gpt2"
    if (linear("qkv", "proj") and all(_int(getattr(module, a, None)) for a in ("num_heads", "head_dim", "attn_dim"))
            and getattr(module, "gate", None) is None
            and isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)):
        return "fused"
    return None


def _separate_out(module: nn.Module) -> str | None:
    """The output projection's child name of a ``separate`` attention: ``o_proj`` (Llama, Mistral, Qwen...)
    or ``dense`` (Phi), an ``nn.Linear`` either way."""
    for child in ("o_proj", "dense"):
        if type(getattr(module, child, None)) is nn.Linear:
            return child
    return None


def _layout(name: str, module: nn.Module, parent: nn.Module | None) -> HeadLayout | None:
    """The module's :class:`HeadLayout` when its widths are consistent, else None."""
    family = head_family(module)
    p = (lambda child: f"{name}.{child}" if name else child)
    if family == "fused":
        if fused_head_layout(module) is None:
            return None
        heads, dim = fused_head_layout(module)
        return HeadLayout(name, family, p("qkv"), p("qkv"), p("qkv"), p("proj"), heads, heads, dim)
    if family == "separate":
        dim, out = module.head_dim, _separate_out(module)
        q, k, v, o = module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features, \
            getattr(module, out).in_features
        groups = getattr(module, "num_key_value_groups", None)
        if q % dim or k % dim or k != v or o != q or (q // dim) % (k // dim) or \
                (groups is not None and groups != (q // dim) // (k // dim)):
            return None
        return HeadLayout(name, family, p("q_proj"), p("k_proj"), p("v_proj"), p(out), q // dim, k // dim, dim)
    if family == "bert":
        dim, heads = module.attention_head_size, module.num_attention_heads
        out = getattr(getattr(parent, "output", None), "dense", None)
        widths = {module.query.out_features, module.key.out_features, module.value.out_features}
        if getattr(parent, "self", None) is not module or type(out) is not nn.Linear or widths != {heads * dim} \
                or out.in_features != heads * dim:
            return None
        base = name.rpartition(".")[0]
        return HeadLayout(name, family, p("query"), p("key"), p("value"), f"{base}.output.dense" if base else
                          "output.dense", heads, heads, dim)
    if family == "gpt2":
        heads, dim, split = module.num_heads, module.head_dim, module.split_size
        if split != heads * dim or module.c_attn.weight.shape[1] != 3 * split or module.c_proj.weight.shape[0] != split:
            return None
        return HeadLayout(name, family, p("c_attn"), p("c_attn"), p("c_attn"), p("c_proj"), heads, heads, dim)
    return None


def _projection_prefixes(layout: HeadLayout) -> tuple[str, ...]:
    """``"<child>."`` for each projection inside the attention module (names relative to it); BERT's output
    projection is a sibling and not among them."""
    prefix = f"{layout.module}." if layout.module else ""
    return tuple(n[len(prefix):] + "." for n in {layout.q, layout.k, layout.v, layout.out} if n.startswith(prefix))


def _other_width_params(module: nn.Module, layout: HeadLayout) -> list[str]:
    """Parameters of the attention module outside its projections with a dimension as wide as all query or
    all key/value heads (OLMo-2 normalises the whole query vector): they would not follow a cut."""
    widths = {layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim} - {layout.head_dim}
    projections = _projection_prefixes(layout)
    return [n for n, p in module.named_parameters()
            if not n.startswith(projections) and any(d in widths for d in p.shape)]


#: int attributes of a submodule that say it holds one part per head
_PER_HEAD_COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads", "n_heads", "n_head")


def _per_head_submodules(module: nn.Module, layout: HeadLayout) -> list[str]:
    """Submodules of the attention module, outside its projections, that hold one part per head (StableLM's
    per-head LayerNorms with ``qk_layernorm``: a list of ``num_heads`` norms applied in head order). They
    would not follow a cut: the kept heads would meet the first heads' parts."""
    counts = {layout.num_heads, layout.num_kv_heads} - {1}
    projections = _projection_prefixes(layout)
    out = []
    for name, sub in module.named_modules():
        if not name or f"{name}.".startswith(projections):
            continue
        listed = isinstance(sub, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and len(sub) in counts
        if listed or any(_int(getattr(sub, a, None)) and getattr(sub, a) in counts for a in _PER_HEAD_COUNTS):
            out.append(name)
    return out


def head_layouts(model: nn.Module) -> list[HeadLayout]:
    """The :class:`HeadLayout` of every attention module of ``model`` whose whole heads pyobc can prune.

    Example:
        >>> import torch.nn as nn
        >>> head_layouts(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    modules = dict(model.named_modules())
    out = []
    for name, module in modules.items():
        if head_family(module) is None or not is_attention_module(module):
            continue
        layout = _layout(name, module, modules.get(name.rpartition(".")[0]) if name else None)
        if layout is not None and not _other_width_params(module, layout) \
                and not _per_head_submodules(module, layout):
            out.append(layout)
    return out


def sync_heads(module: nn.Module) -> None:
    """Set an attention module's head attributes from its projections' widths after whole heads were cut
    (``head_dim`` never changes); ValueError when the widths are not whole, consistent heads."""
    family = head_family(module)
    if family == "fused":
        width = int(module.proj.weight.shape[1])
        _check(width % module.head_dim == 0 and int(module.qkv.weight.shape[0]) == 3 * width, module)
        module.num_heads, module.attn_dim = width // module.head_dim, width
    elif family == "separate":
        dim, q, k = module.head_dim, module.q_proj.out_features, module.k_proj.out_features
        _check(q % dim == 0 and k % dim == 0 and k > 0 and (q // dim) % (k // dim) == 0
               and module.v_proj.out_features == k and getattr(module, _separate_out(module)).in_features == q,
               module)
        for attr, value in (("num_key_value_groups", q // k), ("num_heads", q // dim),
                            ("num_attention_heads", q // dim), ("num_key_value_heads", k // dim)):
            if _int(getattr(module, attr, None)):
                setattr(module, attr, value)
    elif family == "bert":
        width = module.query.out_features
        _check(width % module.attention_head_size == 0 and module.key.out_features == width
               and module.value.out_features == width, module)
        module.num_attention_heads, module.all_head_size = width // module.attention_head_size, width
    elif family == "gpt2":
        width = int(module.c_proj.weight.shape[0])
        _check(width % module.head_dim == 0 and int(module.c_attn.weight.shape[1]) == 3 * width, module)
        module.num_heads, module.split_size = width // module.head_dim, width
    else:
        raise ValueError(f"{type(module).__name__} is not an attention module whose heads pyobc cuts")


def _check(ok: bool, module: nn.Module) -> None:
    if not ok:
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
        raise ValueError(f"{type(module).__name__}: the projections do not hold whole, consistent heads "
                         f"after the cut: {shapes}")


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
        # only ints: a model may keep lists here (CrossViT's embed_dim, one per branch)
        widths = {w for w in (getattr(module, a, None) for a in WIDTH_ATTRIBUTES) if _int(w)}
        if not widths:
            continue
        for child_name, child in module.named_children():
            if isinstance(child, CONV) and child.out_channels in widths:
                out.setdefault(f"{name}.{child_name}" if name else child_name, name)
    return out

