"""A Hugging Face model's config after a cut: the config says what the modules are.

Cutting whole heads or MLP neurons changes the modules; ``model.config`` would still describe the old
widths, so ``save_pretrained`` → ``from_pretrained`` would build the wrong shapes. After every cut
(:func:`pyobc.pruning.slicing.apply_remove`), :func:`sync_config` writes the per-layer widths back:

- ``num_attention_heads`` (GPT-2: ``n_head``, through the config's attribute map), ``num_key_value_heads``
  where the config has it, and ``head_dim`` where the config has it (it never changes, but many configs
  derive it from ``hidden_size // num_attention_heads`` when it is absent);
- ``intermediate_size`` (GPT-2: ``n_inner``), and the MLP modules' own ``intermediate_size`` attribute;
- ``hidden_size`` (and the modules' own ``hidden_size``) after a hidden-width cut (:mod:`pyobc.hidden_width`).

A value that is the same in every layer is written as a number, so a uniform cut round-trips through
``save_pretrained`` / ``from_pretrained`` (for GPT-2 and BERT head cuts it cannot: those configs derive the
head width from the hidden size). Values that differ between layers go, as per-layer lists, into
``config.pyobc_layer_widths`` (``{"intermediate_size": [...], ...}``; the configs of transformers 5 are
typed and refuse a list in their own fields), and the field itself keeps its old value:
``from_pretrained`` then builds the unpruned shapes and refuses the smaller weights with a size-mismatch
error. Use :func:`pyobc.save` / :func:`pyobc.load` for such models.

Example:
    >>> import torch.nn as nn
    >>> sync_config(nn.Linear(2, 2))   # no config: nothing to do
"""
from __future__ import annotations

import torch.nn as nn

from ..attention_heads import head_layouts
from ..layers import is_transposed_linear

__all__ = ["mlp_widths", "sync_config"]


def mlp_widths(model: nn.Module) -> list[int]:
    """The hidden width of every transformer MLP pyobc recognises (gated ``gate_proj``/``up_proj``/
    ``down_proj``, GPT-2's ``c_fc``/``c_proj``, BERT's ``intermediate.dense``, an ``mlp`` of ``fc1``/``fc2``
    as in Phi), in module order.

    Example:
        >>> import torch.nn as nn
        >>> mlp = nn.Module()
        >>> mlp.up_proj, mlp.down_proj = nn.Linear(4, 16), nn.Linear(16, 4)
        >>> mlp_widths(nn.ModuleDict({"mlp": mlp}))
        [16]
    """
    out = []
    for name, m in model.named_modules():
        kids = dict(m.named_children())
        if type(kids.get("down_proj")) is nn.Linear and ({"up_proj", "gate_proj", "gate_up_proj"} & set(kids)):
            out.append(kids["down_proj"].in_features)
        elif is_transposed_linear(kids.get("c_fc")) and is_transposed_linear(kids.get("c_proj")):
            out.append(int(kids["c_fc"].weight.shape[1]))
        elif name.rpartition(".")[2] == "intermediate" and type(kids.get("dense")) is nn.Linear:
            out.append(kids["dense"].out_features)
        elif name.rpartition(".")[2] == "mlp" and type(kids.get("fc1")) is nn.Linear \
                and type(kids.get("fc2")) is nn.Linear:  # Phi, CLIP
            out.append(kids["fc2"].in_features)
    return out


def _write(config, field: str, values: list[int], per_layer: dict[str, list[int]]) -> None:
    """``config.field = value`` when every layer has the same value, else the list in ``per_layer``."""
    if len(set(values)) == 1:
        setattr(config, field, values[0])
    else:
        per_layer[field] = list(values)


def _sync_hidden(model: nn.Module, config) -> None:
    """``hidden_size`` (config and modules' own copies) from the input embedding's width, after a hidden cut."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    old = getattr(config, "hidden_size", None)
    if not isinstance(embedding, nn.Embedding) or not isinstance(old, int) or embedding.embedding_dim == old:
        return
    new = embedding.embedding_dim
    for m in model.modules():
        if getattr(m, "hidden_size", None) == old and m is not model:
            m.hidden_size = new
    config.hidden_size = new


def sync_config(model: nn.Module) -> None:
    """Write the per-layer head counts and MLP widths of ``model`` into ``model.config`` (see the module
    docstring); a no-op for models without a Hugging Face config or whose layers pyobc does not find
    once per ``config.num_hidden_layers``."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if config is None or not hasattr(config, "to_dict") or not isinstance(layers, int):
        return
    _sync_hidden(model, config)
    for m in model.modules():  # the MLP modules' own copy of the width (Llama's MLP keeps one)
        down = getattr(m, "down_proj", None)
        if isinstance(getattr(m, "intermediate_size", None), int) and type(down) is nn.Linear:
            m.intermediate_size = down.in_features
    per_layer: dict[str, list[int]] = {}
    heads = head_layouts(model)
    if len(heads) == layers:
        _write(config, "num_attention_heads", [h.num_heads for h in heads], per_layer)
        if hasattr(config, "num_key_value_heads"):
            _write(config, "num_key_value_heads", [h.num_kv_heads for h in heads], per_layer)
        if hasattr(config, "head_dim") and len({h.head_dim for h in heads}) == 1:
            config.head_dim = heads[0].head_dim
    widths = mlp_widths(model)
    if len(widths) == layers:
        field = "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner"
        _write(config, field, widths, per_layer)
    if per_layer or hasattr(config, "pyobc_layer_widths"):
        config.pyobc_layer_widths = per_layer
