"""``pyobc.prune``: physically remove the lowest-scored channels of every group.

Scores and scope
----------------
``scope="global"`` ranks the channels of all groups together, so it is only meaningful when scores are
comparable across layers. The data-driven criteria estimate a loss change (``taylor``, ``obd``,
``jacobian``/``obc``, ``sosp-h``, ``sosp-i``, ``ec``, ``oracle``): they are on one scale, although groups
with many members (residual streams) sum more terms and tend to score higher. ``magnitude`` depends on
layer sizes and weight scales and is better used with ``scope="local"``. ``oba`` divides each group by its
maximum by default (``normalize="max"``), so every group's best channel scores 1: its global ranking
compares channels *relative to their group*, as the reference implementation does. ``scope="local"`` removes
the same fraction from every group and needs no comparability.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..grouping import Group, unwrap_model
from ..scores import Scores, model_signature
from . import plan as _plan
from .counting import count_params, macs_from, tensor_shapes, trace_costs
from .report import LayerWidth, PruneReport
from .selection import choose
from .slicing import apply_remove, cuts, find_target, removed_mask, shapes_after

__all__ = ["prune", "check_scores", "select", "resolve_ignored", "plan_removal"]

SCOPES = ("global", "local")
TARGETS = ("channels", "params", "macs")


def _check_common(ratio: float, scope: str, target: str, round_to: int | None, max_layer_ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise TypeError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (the fraction removed), got {ratio}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    if isinstance(max_layer_ratio, bool) or not isinstance(max_layer_ratio, (int, float)) \
            or not 0.0 < max_layer_ratio <= 1.0:
        raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio!r}")
    return float(ratio)


def check_scores(model: nn.Module, scores: Scores) -> None:
    """Raise a clear error unless ``scores`` were computed on ``model`` as it is now."""
    if not isinstance(scores, Scores):
        raise TypeError(f"scores must be a pyobc.Scores (from pyobc.score), got {type(scores).__name__}")
    if scores.signature:
        have = model_signature(model)
        want = dict(scores.signature)
        if have != want:
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            shape = sorted(k for k in set(want) & set(have) if tuple(want[k]) != tuple(have[k]))
            parts = []
            if shape:
                parts.append("different shapes: " + ", ".join(f"{k} {tuple(want[k])} vs {tuple(have[k])}"
                                                               for k in shape[:3]))
            if missing:
                parts.append("missing: " + ", ".join(missing[:3]))
            if extra:
                parts.append("not scored: " + ", ".join(extra[:3]))
            raise ValueError("these scores were computed on a different model (or on this one before it was "
                             "pruned, wrapped or masked): " + "; ".join(parts)
                             + ". Score the model as it is now.")
    for g in scores.groups:
        for m in g.members:
            try:
                find_target(model, m)
            except KeyError as e:
                raise ValueError(f"group {g.root!r}: {e.args[0]}; these scores belong to another model") from None


def resolve_ignored(model: nn.Module, ignored_layers: Sequence[nn.Module | str]) -> set[str]:
    """Qualified names of ``ignored_layers`` (and of their submodules and parameters)."""
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    ids = {id(m): n for n, m in model.named_modules()}
    names: set[str] = set()
    for layer in ignored_layers:
        if isinstance(layer, str):
            try:
                layer_mod = model.get_submodule(layer)
            except AttributeError:
                params = dict(model.named_parameters())
                if layer in params:
                    names.add(layer)
                    continue
                raise ValueError(f"ignored_layers: the model has no layer named {layer!r}") from None
            name = layer
        elif isinstance(layer, nn.Module):
            if id(layer) not in ids:
                raise ValueError(f"ignored_layers: {type(layer).__name__} is not a module of this model")
            layer_mod, name = layer, ids[id(layer)]
        else:
            raise TypeError(f"ignored_layers entries must be modules or names, got {type(layer).__name__}")
        for sub, _ in layer_mod.named_modules(prefix=name):
            names.add(sub)
        for p, _ in layer_mod.named_parameters(prefix=name):
            names.add(p)
    return names


def _is_ignored(group: Group, ignored: set[str]) -> bool:
    """A group is left whole when it would change the width of an ignored layer (an in-member only loses
    inputs, which Torch-Pruning also allows for ignored layers)."""
    return any(m.module in ignored and m.kind != "in" for m in group.members)


def select(model: nn.Module, scores: Scores, ratio: float, *, scope: str, target: str, round_to: int | None,
           max_layer_ratio: float, ignored: set[str], costs: Any = None,
           min_keep: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Root -> root channels to remove, for the candidate (not ignored) groups of ``scores``."""
    pairs = [(g, v) for g, v in zip(scores.groups, scores.values) if not _is_ignored(g, ignored)]
    groups = [g for g, _ in pairs]
    values = [v for _, v in pairs]
    if target == "channels":
        total = float(sum(g.size for g in groups))
        measure = None if scope == "local" else (
            lambda removal: total - sum(int(r.numel()) for r in removal.values()))
    else:
        shapes = tensor_shapes(model)
        params = {n for n, _ in model.named_parameters()}

        def after(removal):
            return shapes_after(shapes, cuts(model, groups, removal, shapes=shapes)[0])

        if target == "params":
            total = float(count_params(model))
            measure = (lambda removal: float(sum(math.prod(s) for n, s in after(removal).items() if n in params)))
        else:
            total = float(macs_from(costs, shapes))
            measure = (lambda removal: float(macs_from(costs, after(removal))))
    return choose(groups, values, ratio, scope=scope, round_to=round_to, max_layer_ratio=max_layer_ratio,
                  measure=measure, total=total, min_keep=min_keep)


def _compensate(model: nn.Module, groups: Sequence[Group], remove: Mapping[str, torch.Tensor],
                scores: Scores) -> None:
    shifts = scores.extras.get("ec_channel_shift")
    if not shifts:
        raise ValueError(f"compensate=True needs scores that carry structured bias shifts "
                         f"(extras['ec_channel_shift'], from method 'ec'); these {scores.method!r} scores have none")
    by_root = {g.root: g for g in groups}
    with torch.no_grad():
        for root, channels in remove.items():
            group = by_root[root]
            mask = removed_mask(group, channels)
            if not bool(mask.any()):
                continue
            for m in group.members:
                if m.kind != "in" or m.module not in shifts:
                    continue
                layer = model.get_submodule(m.module)
                shift = shifts[m.module]
                if getattr(layer, "bias", None) is None:
                    continue  # ec gives bias-free layers no shift
                if shift.shape[0] != layer.bias.shape[0]:
                    raise ValueError(f"ec_channel_shift[{m.module!r}] has {shift.shape[0]} rows but the layer "
                                     f"has {layer.bias.shape[0]} outputs")
                cols = m.index[mask[m.root]]
                layer.bias.add_(shift[:, cols].sum(1).to(layer.bias.device, layer.bias.dtype))


def plan_removal(model: nn.Module, scores: Scores, ratio: float, *, scope: str, ignored_layers, round_to,
                 max_layer_ratio: float, target: str, example_inputs: Any,
                 min_keep: Mapping[str, int] | None = None):
    """Check the arguments and choose the channels to remove (shared by :func:`prune` and
    :func:`pyobc.equivalent_prune`): returns ``(unwrapped model, ratio, {root: removed channels}, costs)``."""
    ratio = _check_common(ratio, scope, target, round_to, max_layer_ratio)
    model = unwrap_model(model)
    check_scores(model, scores)
    if target == "macs" and example_inputs is None:
        raise ValueError("target='macs' needs example_inputs (to measure each layer's workload)")
    ignored = resolve_ignored(model, ignored_layers)
    costs = trace_costs(model, example_inputs) if example_inputs is not None else None
    remove = select(model, scores, ratio, scope=scope, target=target, round_to=round_to,
                    max_layer_ratio=max_layer_ratio, ignored=ignored, costs=costs, min_keep=min_keep)
    return model, ratio, remove, costs


def _prune(model: nn.Module, scores: Scores, ratio: float, *, scope: str = "global",
           ignored_layers: Sequence[nn.Module | str] = (), round_to: int | None = None,
           max_layer_ratio: float = 0.95, inplace: bool = False, compensate: bool = False,
           target: str = "channels", example_inputs: Any = None,
           min_keep: Mapping[str, int] | None = None) -> tuple[nn.Module, PruneReport]:
    model, ratio, remove, costs = plan_removal(
        model, scores, ratio, scope=scope, ignored_layers=ignored_layers, round_to=round_to,
        max_layer_ratio=max_layer_ratio, target=target, example_inputs=example_inputs, min_keep=min_keep)
    groups = list(scores.groups)
    signature = model_signature(model)
    params_before = count_params(model)
    macs_before = macs_from(costs, tensor_shapes(model)) if costs is not None else None

    out = model if inplace else copy.deepcopy(model)
    if compensate:
        _compensate(out, groups, remove, scores)
    apply_remove(out, groups, remove)
    keep = {}
    layers = []
    for g in groups:
        mask = removed_mask(g, remove.get(g.root, ()))
        keep[g.root] = (~mask).nonzero().reshape(-1)
        layers.append(LayerWidth(g.root, int((~mask).sum()), g.size))
    _plan.record(out, signature, groups, keep, example_inputs)
    macs_after = None
    if example_inputs is not None:  # also checks that the pruned model runs
        macs_after = macs_from(trace_costs(out, example_inputs), tensor_shapes(out))
    report = PruneReport(method=scores.method, ratio=ratio, scope=scope, target=target,
                         params_before=params_before, params_after=count_params(out), macs_before=macs_before,
                         macs_after=macs_after, layers=layers,
                         removed={r: v.clone() for r, v in remove.items() if v.numel()}, compensated=compensate)
    return out, report


def prune(model: nn.Module, scores: Scores, ratio: float, *, scope: str = "global",
          ignored_layers: Sequence[nn.Module | str] = (), round_to: int | None = None,
          max_layer_ratio: float = 0.95, inplace: bool = False, compensate: bool = False,
          target: str = "channels", example_inputs: Any = None) -> tuple[nn.Module, PruneReport]:
    """Physically remove the lowest-scored channels; returns ``(pruned_model, report)``.

    Every member of a group is cut together (producer rows and biases, norm channels and running
    statistics, consumer columns, residual partners, attention projections, bare parameters), as the
    :class:`~pyobc.grouping.Group` records in ``scores`` describe; the result is an ordinary, smaller model.

    Args:
        model: the model ``scores`` were computed on, as it is now (checked against ``scores.signature``).
        scores: from :func:`pyobc.score`.
        ratio: fraction of the ``target`` quantity to remove, in ``[0, 1)``.
        scope: ``"global"`` ranks all channels together (scores must be comparable across layers: see
            :mod:`pyobc.pruning.prune`); ``"local"`` removes the same fraction from every group.
        ignored_layers: modules or names whose width must not change (their groups are left whole).
        round_to: kept channel counts are multiples of it (a group smaller than it is left whole).
        max_layer_ratio: at most this fraction of any group is removed; at least one channel is kept.
        inplace: prune ``model`` itself; by default a pruned copy is returned and ``model`` is untouched.
        compensate: add the structured elimination-compensation bias shifts of the removed channels to the
            consumers' biases (needs ``ec`` scores; ValueError otherwise).
        target: ``"channels"`` (default), ``"params"`` or ``"macs"``: channels are taken in ascending score
            order until the reduction of that quantity, computed from the pruned shapes, reaches ``ratio``.
        example_inputs: inputs to measure MACs with (needed for ``target="macs"``; otherwise optional, the
            report then has no MACs). Also saved (one sample) in the plan, to rebuild groups on load.

    Groups feeding attention keep equal head widths: every head loses the same number of channels, and the
    kept count is a multiple of ``group.divisor``. The plan of the call is appended to ``pruned.pyobc_plan``
    (see :func:`pyobc.save`). Optimizers must be created after pruning (parameters are new tensors).

    Raises:
        ValueError: ratio or options out of range, scores from another model (or another pruning state),
            a group whose layers are not in the model, ``compensate`` without ``ec`` scores.
        NotImplementedError: a group contains a layer pyobc cannot cut (named; ignore it).

    Example:
        >>> import torch, pyobc
        >>> model = pyobc.models.resnet20(in_channels=1, input_size=8, width=0.5)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> scores = pyobc.score(model, None, "magnitude", example_inputs=x)
        >>> small, report = pyobc.prune(model, scores, 0.5, scope="local", example_inputs=x)
        >>> small(x).shape, report.channels_after / report.channels_before
        (torch.Size([2, 10]), 0.5)
    """
    return _prune(model, scores, ratio, scope=scope, ignored_layers=ignored_layers, round_to=round_to,
                  max_layer_ratio=max_layer_ratio, inplace=inplace, compensate=compensate, target=target,
                  example_inputs=example_inputs)
