"""The hidden (residual-stream) width of Hugging Face Llama-family decoders: pruned only on request.

Every decoder layer reads and writes the same hidden width: the input embedding, every RMSNorm over it,
the query/key/value and gate/up projections (their input columns), the output and down projections (their
output rows) and the LM head (its input columns, tied to the embedding or not). Removing hidden channel
``c`` removes all of those at once: one group, built from the modules (:func:`hidden_layout`), not traced.

``pyobc.score(..., hidden=True)`` adds that group. Removing channels from an RMSNorm's input changes its
mean square (a sum over fewer channels divided by fewer channels), so after the cut the norms' weights are
multiplied by ``sqrt(old width / new width)`` (:mod:`pyobc.pruning.slicing`): with ``eps = 0`` the pruned
model then computes exactly what the unpruned one computes with those channels zeroed, and nearly so with
a small ``eps``. ``config.hidden_size`` and the modules' ``hidden_size`` attributes follow
(:mod:`pyobc.pruning.model_config`).

Example:
    >>> import torch.nn as nn
    >>> hidden_layout(nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    ValueError: hidden=True: Linear has no Hugging Face config with hidden_size; pyobc prunes the hidden width of Llama-family decoders only
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from .attention_heads import head_layouts
from .layers import is_norm_layer

__all__ = ["HIDDEN_MODEL_TYPES", "HiddenLayout", "hidden_layout"]

#: ``config.model_type`` of the decoders whose hidden width ``hidden=True`` cuts (Gemma's norms are
#: ``(1 + w) * x / rms(x)`` and it scales the embedding by ``sqrt(hidden_size)``: a rescale would not keep them)
HIDDEN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class HiddenLayout:
    """The modules that carry a decoder's hidden width (qualified names)."""

    width: int
    embedding: str
    norms: tuple[str, ...]
    readers: tuple[str, ...]  #: linear layers whose input columns are the hidden channels
    writers: tuple[str, ...]  #: linear layers whose output rows are the hidden channels


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def _check(model: nn.Module) -> tuple[int, list]:
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"hidden=True: {type(model).__name__} has no Hugging Face config with hidden_size; pyobc "
                         "prunes the hidden width of Llama-family decoders only")
    heads = head_layouts(model)
    if not heads or any(h.family != "separate" for h in heads):
        raise ValueError("hidden=True: pyobc prunes the hidden width of Llama-family decoders only (q_proj/k_proj/"
                         f"v_proj/o_proj attention); {type(model).__name__} has "
                         + (", ".join(sorted({h.family for h in heads})) or "no such") + " attention")
    model_type = getattr(config, "model_type", None)
    if model_type not in HIDDEN_MODEL_TYPES:
        raise ValueError(f"hidden=True: pyobc cuts the hidden width of {', '.join(HIDDEN_MODEL_TYPES)} models, whose "
                         "norms are weight * x / rms(x) and whose embeddings are not scaled by the width; got "
                         f"model_type={model_type!r}")
    return width, heads


def hidden_layout(model: nn.Module) -> HiddenLayout:
    """The :class:`HiddenLayout` of a Llama-family decoder; ValueError (saying why) for other models or when
    some parameter outside those modules also has the hidden width (it could not follow the cut)."""
    width, heads = _check(model)
    embedding = _name_of(model, model.get_input_embeddings())
    head = _name_of(model, model.get_output_embeddings())
    if embedding is None or model.get_input_embeddings().embedding_dim != width:
        raise ValueError("hidden=True: the input embedding does not have the config's hidden_size")
    readers = [n for h in heads for n in dict.fromkeys((h.q, h.k, h.v))]
    writers = [h.out for h in heads]
    inside = tuple(h.module + "." for h in heads)
    for name, m in model.named_modules():
        kids = dict(m.named_children())
        if type(kids.get("down_proj")) is nn.Linear:
            prefix = f"{name}." if name else ""
            readers += [prefix + k for k in ("gate_proj", "up_proj") if type(kids.get(k)) is nn.Linear]
            writers.append(prefix + "down_proj")
    if head is not None:
        readers.append(head)
    norms = [n for n, m in model.named_modules() if is_norm_layer(m) and not n.startswith(inside)
             and getattr(m, "weight", None) is not None and m.weight.numel() == width]
    layout = HiddenLayout(width, embedding, tuple(norms), tuple(readers), tuple(writers))
    _check_covered(model, layout)
    return layout


def _check_covered(model: nn.Module, layout: HiddenLayout) -> None:
    covered = {layout.embedding, *layout.norms, *layout.readers, *layout.writers}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner not in covered and layout.width in p.shape:
            raise ValueError(f"hidden=True: parameter {name} {tuple(p.shape)} has the hidden width but is not one "
                             "of the embedding, norm or projection weights pyobc cuts with it")
    for name in layout.readers + layout.writers:
        m = model.get_submodule(name)
        width = m.in_features if name in layout.readers else m.out_features
        if type(m) is not nn.Linear or width != layout.width:
            raise ValueError(f"hidden=True: {name} does not read or write the hidden width {layout.width}")
