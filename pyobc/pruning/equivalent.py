"""Equivalent Pruning (Optimal Brain Connection, Chen et al. 2025): prune through trainable adapters, fold later.

For a group whose channel dimension is internal — a conv/linear layer ``l`` producing ``c`` channels, read
only by the next layer(s) — pruning to ``k`` channels inserts two linear maps instead of cutting ``l``::

    conv_l (c outputs) -> C (1x1, c -> k) -> norm_l (k) -> activation ... -> D (1x1, k -> c) -> conv_{l+1} (c inputs)

``C`` starts as the selection rows of the kept channels and ``D`` as the selection columns, so the adapter
model computes exactly what naive pruning computes; fine-tuning then trains ``C`` and ``D`` too (give them
their own learning rate and weight decay with :func:`adapter_parameters`). Nothing nonlinear lies between
``conv_l`` and ``C``, nor between ``D`` and ``conv_{l+1}``, so :func:`fold` merges them exactly:
``W_l' = C W_l``, ``b_l' = C b_l``, ``W_{l+1}' = W_{l+1} x_in D``: a plain network ``k`` channels wide.

Which groups get adapters (decided from the :class:`~pyobc.grouping.Group` records alone): exactly one
``out`` member, the root, a conv (ungrouped, not transposed) or linear layer; any number of ``norm`` members;
at least one ``in`` member, each a conv (ungrouped) or linear layer that reads every one of its input
channels from this group, one input channel (or feature) per root channel; nothing else (no residual
partners, attention, bare parameters or head constraints). In the zoo that is every VGG conv and its
hidden classifier layer, the first conv of every ResNet basic block (conv1 -> bn1 -> relu -> conv2), the
ViT's MLP blocks (fc1 -> GELU -> fc2) and every MLP layer. Other groups (residual streams, the ViT's
embedding stream) are pruned physically in the same call, so the adapter model has exactly the channels
naive pruning would keep.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..grouping import Group
from ..layers import CONV, is_weight_layer
from ..masking import removed_mask
from ..errors import PrunedModelError
from ..model_state import preserved_state, unwrap_model
from ..scoring.scores import Scores, model_signature
from . import plan
from .adapters import OBCAdapted
from .reconstruct import calibration_for, not_refit, plan_targets, refit, selection_scores
from .removal import plan_removal
from .counting import run_naming_failure
from .slicing import RULES, apply_remove, broken_model_message

__all__ = ["OBCAdapted", "qualifies", "equivalent_prune", "adapter_parameters", "fold"]

_PENDING = "pyobc_pending_fold"


def _plain_layer(m: nn.Module) -> bool:
    """A linear layer or an ungrouped, non-transposed conv: one weight column block per input channel."""
    return is_weight_layer(m) and getattr(m, "groups", 1) == 1


def _one_to_one(member, size: int) -> bool:
    return (member.root.numel() == size and member.index.numel() == size
            and torch.equal(torch.sort(member.root).values, torch.arange(size))
            and torch.unique(member.index).numel() == size)


def qualifies(model: nn.Module, group: Group) -> str | None:
    """None if ``group`` can be pruned with adapters, else the reason why not."""
    if group.divisor != 1:
        return "its width must stay a multiple of a head count"
    outs = [m for m in group.members if m.kind == "out"]
    ins = [m for m in group.members if m.kind == "in"]
    others = [m for m in group.members if m.kind not in ("out", "in", "norm")]
    if others:
        return f"it has {others[0].kind} members ({others[0].module})"
    if len(outs) != 1 or outs[0].module != group.root:
        return "its channels are produced by several layers (a residual stream)"
    if not ins:
        return "no layer reads its channels"
    for m in outs + ins:
        layer = model.get_submodule(m.module)
        if not _plain_layer(layer):
            return f"{m.module} is not an ungrouped conv or linear layer"
        if not _one_to_one(m, group.size):
            return f"{m.module} does not map its channels one-to-one to the group's"
    for m in ins:
        layer = model.get_submodule(m.module)
        if m.index.numel() != layer.weight.shape[1]:
            return f"{m.module} also reads channels from other layers"
    return None


def _channel_map(like: nn.Module, matrix: torch.Tensor) -> nn.Module:
    """A bias-free map over the channel dim of ``like``'s inputs/outputs with weight ``matrix`` (out x in)."""
    n_out, n_in = matrix.shape
    w = like.weight
    if isinstance(like, CONV):
        d = w.dim() - 2
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        m = conv(n_in, n_out, 1, bias=False)
        m.weight = nn.Parameter(matrix.reshape(n_out, n_in, *([1] * d)).to(w.device, w.dtype))
    else:
        m = nn.Linear(n_in, n_out, bias=False)
        m.weight = nn.Parameter(matrix.to(w.device, w.dtype))
    return m.to(w.device)


def _positions(member, channels: torch.Tensor) -> torch.Tensor:
    """The member's own channel positions of root ``channels`` (one each)."""
    where = torch.full((int(member.root.max()) + 1,), -1, dtype=torch.long)
    where[member.root] = member.index
    return where[channels]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def equivalent_prune(model: nn.Module, scores: Scores, ratio: float, *, scope: str = "global",
                     ignored_layers: Sequence[nn.Module | str] = (), round_to: int | None = None,
                     max_layer_ratio: float = 0.95, target: str = "channels", example_inputs: Any = None,
                     inplace: bool = False, reconstruct: Iterable | None = None, reconstruct_batches: int | None = 8,
                     damping: float = 0.01, reconstruct_loss_fn: Callable | None = None,
                     selection: str = "scores", progress: bool | None = None) -> nn.Module:
    """Prune like :func:`pyobc.prune`, but through trainable adapters where the channel dim is internal.

    The channels removed are exactly those :func:`pyobc.prune` would remove with the same arguments. Groups
    that qualify (see :mod:`pyobc.pruning.equivalent`) keep their producer and consumers at full width with
    ``C``/``D`` adapters (selection matrices) and their norms cut to the kept channels; the other groups are
    cut physically. At initialisation the result computes exactly what the naively pruned model computes.
    Fine-tune it, then :func:`fold` it.

    With ``reconstruct`` (and ``reconstruct_batches``, ``damping``, ``reconstruct_loss_fn``, ``selection``,
    ``progress`` as in :func:`pyobc.prune`) the adapters start from a reconstructed model: every layer that
    lost inputs gets the least-squares refit :func:`pyobc.prune` would give it, written into the live columns
    of the full-width layer (the columns the input adapter ``D`` selects), so the result computes what
    ``pyobc.prune(..., reconstruct=...)`` computes, and fine-tuning starts from there.

    Example:
        >>> import torch, pyobc
        >>> model = pyobc.models.vgg11(in_channels=1, input_size=8, width=0.125)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> scores = pyobc.score(model, None, "magnitude", example_inputs=x)
        >>> adapted = pyobc.equivalent_prune(model, scores, 0.5, scope="local")
        >>> naive, _ = pyobc.prune(model, scores, 0.5, scope="local")
        >>> torch.allclose(adapted.eval()(x), naive.eval()(x), atol=1e-5)
        True
        >>> base = [p for p in adapted.parameters() if all(p is not q for q in pyobc.adapter_parameters(adapted))]
        >>> # pyobc.models.train(adapted, loader, 2, 0.01, param_groups=[{"params": base},
        >>> #     {"params": pyobc.adapter_parameters(adapted), "lr": 0.01, "weight_decay": 0.0}])
        >>> plain = pyobc.fold(adapted)          # a plain VGG, half as wide
    """
    cal = calibration_for(model, reconstruct, reconstruct_batches, reconstruct_loss_fn)
    scores = selection_scores(model, scores, selection, cal, damping=damping, ignored_layers=ignored_layers,
                              progress=progress)
    removal = plan_removal(model, scores, ratio, scope=scope, ignored_layers=ignored_layers, round_to=round_to,
                           max_layer_ratio=max_layer_ratio, target=target, example_inputs=example_inputs)
    model, remove = removal.model, removal.remove
    groups = list(scores.groups)
    out = model if inplace else copy.deepcopy(model)
    dense = copy.deepcopy(model) if inplace and cal is not None else model
    adapted = {g.root: g for g in groups
               if remove.get(g.root) is not None and remove[g.root].numel() and qualifies(out, g) is None}

    # 1. everything else is cut physically (its own plan entry)
    naive = {r: v for r, v in remove.items() if r not in adapted and v.numel()}
    signature = model_signature(out)
    apply_remove(out, groups, naive)
    plan.record(out, signature, groups,
                 {g.root: (~removed_mask(g, naive.get(g.root, ()))).nonzero().reshape(-1) for g in groups},
                 example_inputs)
    pending_signature = model_signature(out)

    # 2. adapters for the qualifying groups; their norms are cut to the kept channels
    maps: dict[str, dict[str, torch.Tensor]] = {}
    keep: dict[str, torch.Tensor] = {}
    for root, g in adapted.items():
        kept = (~removed_mask(g, remove[root])).nonzero().reshape(-1)
        keep[root] = kept
        k = kept.numel()
        norms = tuple(m for m in g.members if m.kind == "norm")
        if norms:
            apply_remove(out, [Group(g.root, g.size, norms, g.divisor)], {root: remove[root]})
        for m in g.members:
            if m.kind not in ("out", "in"):
                continue
            layer = out.get_submodule(m.module)
            pos = _positions(m, kept)
            if m.kind == "out":
                c = torch.zeros(k, layer.weight.shape[0], dtype=torch.float64)
                c[torch.arange(k), pos] = 1.0
                maps.setdefault(m.module, {})["post"] = c
            else:
                d = torch.zeros(layer.weight.shape[1], k, dtype=torch.float64)
                d[pos, torch.arange(k)] = 1.0
                maps.setdefault(m.module, {})["pre"] = d
    for name, pm in maps.items():
        layer = out.get_submodule(name)
        pre = _channel_map(layer, pm["pre"]) if "pre" in pm else None
        post = _channel_map(layer, pm["post"]) if "post" in pm else None
        _set_module(out, name, OBCAdapted(layer, pre, post))
    _check_runs(out, removal.example_inputs, groups, remove)
    if cal is not None:
        dead = {r: remove[r] for r in adapted}
        refit(dense, out, plan_targets(dense, out, groups, naive, dead), cal, damping=damping, progress=progress,
              skipped=not_refit(groups, naive, dead))
    setattr(out, _PENDING, {"signature": pending_signature, "groups": list(adapted.values()), "keep": keep,
                            "example_inputs": example_inputs})
    return out


def _check_runs(model: nn.Module, inputs: Any, groups: Sequence[Group], remove: dict[str, torch.Tensor]) -> None:
    """The adapted model runs on the example inputs (when there are some), or a PrunedModelError names the
    groups cut near the failing module: never hand back a broken model."""
    if inputs is None:
        return
    try:
        with torch.no_grad(), preserved_state(model):
            run_naming_failure(model, inputs)
    except RuntimeError as e:
        raise PrunedModelError(broken_model_message(e, groups, remove)) from e


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The C and D adapter weights of an :func:`equivalent_prune` model (for their own optimizer settings).

    Example:
        >>> # groups = [{"params": base}, {"params": pyobc.adapter_parameters(m), "lr": 0.01, "weight_decay": 0}]
    """
    out = []
    for m in unwrap_model(model).modules():
        if isinstance(m, OBCAdapted):
            for sub in (m.pre, m.post):
                if sub is not None:
                    out.extend(sub.parameters())
    return out


def _sync(kind: str, layer: nn.Module) -> None:
    for rule in RULES:
        if rule.kind == kind and isinstance(layer, rule.types):
            rule.sync(layer, {})
            return
    raise AssertionError(kind)


def _matrix(adapter: nn.Module) -> torch.Tensor:
    w = adapter.weight.detach()
    return w.reshape(w.shape[0], w.shape[1]).double()


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Merge every adapter into its layer: ``W' = C W``, ``b' = C b``, ``W_next' = W_next x_in D``.

    Returns a plain pruned model (a copy unless ``inplace``) whose layers are the original modules with
    ``k``-channel weights; its plan records the kept channels, so :func:`pyobc.save`/:func:`pyobc.load` work.

    Example:
        >>> # plain = pyobc.fold(adapted)      # same outputs as `adapted`, k channels wide
    """
    model = unwrap_model(model)
    out = model if inplace else copy.deepcopy(model)
    pending = getattr(out, _PENDING, None)
    wrapped = [(n, m) for n, m in out.named_modules() if isinstance(m, OBCAdapted)]
    if pending is None and not wrapped:
        raise ValueError("the model has no Equivalent Pruning adapters (use pyobc.equivalent_prune first)")
    with torch.no_grad():
        for name, m in wrapped:
            layer = m.layer
            w = layer.weight.detach()
            dtype = w.dtype
            w64 = w.double()
            if m.post is not None:
                c = _matrix(m.post)
                w64 = (c @ w64.reshape(w64.shape[0], -1)).reshape(c.shape[0], *w64.shape[1:])
                if layer.bias is not None:
                    layer.bias = nn.Parameter((c @ layer.bias.detach().double()).to(dtype),
                                              requires_grad=layer.bias.requires_grad)
            if m.pre is not None:
                d = _matrix(m.pre)  # (c, k): the layer reads D x, so W' = W x_in D
                w64 = torch.einsum("oi...,ik->ok...", w64, d)
            layer.weight = nn.Parameter(w64.to(dtype).contiguous(), requires_grad=layer.weight.requires_grad)
            if m.post is not None:
                _sync("out", layer)
            if m.pre is not None:
                _sync("in", layer)
            _set_module(out, name, layer)
    if pending is not None:
        plan.record(out, pending["signature"], pending["groups"], pending["keep"], pending["example_inputs"])
        delattr(out, _PENDING)
    return out
