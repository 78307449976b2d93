"""One pruning step in two halves: :func:`plan_removal` decides which channels go, :func:`perform_removal` cuts
them and reports.

:func:`pyobc.prune` is the two in a row. :class:`pyobc.Pruner` calls them with per-group limits of the
original widths (``min_keep``), which the public function does not take, and :func:`pyobc.equivalent_prune`
plans the same removal but carries it out through adapters.

Example:
    >>> import torch, pyobc
    >>> net = pyobc.models.mlp(in_channels=1, input_size=4, hidden=(8,))
    >>> scores = pyobc.score(net, None, "magnitude", example_inputs=torch.randn(2, 1, 4, 4))
    >>> removal = plan_removal(net, scores, 0.25, scope="global", ignored_layers=(), round_to=None,
    ...                        max_layer_ratio=0.95, target="channels", example_inputs=None)
    >>> {root: len(channels) for root, channels in removal.remove.items()}
    {'layers.0': 2}
    >>> small, report = perform_removal(removal)
    >>> small.layers[0].out_features, report.channels_after
    (6, 6)
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import PrunedModelError
from ..grouping import Group
from ..masking import removed_mask
from ..model_state import unwrap_model
from ..scoring.scores import Scores, model_signature
from . import plan
from .counting import LayerCost, count_params, macs_from, tensor_shapes, trace_costs
from .ignored import is_ignored, resolve_ignored
from .reconstruct import Calibration, not_refit, plan_targets, refit
from .report import LayerWidth, PruneReport
from .selection import choose, target_measure
from .slicing import apply_remove, broken_model_message
from .validation import check_prune_options, check_scores
from .zeroing_check import check_zeroing_equivalence, mismatched_groups, zeroed_outputs

__all__ = ["Removal", "plan_removal", "perform_removal"]


@dataclasses.dataclass(frozen=True)
class Removal:
    """The channels one pruning step removes, and what :func:`perform_removal` needs to cut and report them."""

    model: nn.Module  #: the model to prune (wrappers looked through)
    scores: Scores
    ratio: float
    scope: str
    target: str
    remove: dict[str, torch.Tensor]  #: group root -> removed root channels (candidate groups only)
    costs: list[LayerCost] | None  #: per-layer workloads of ``model`` (None without example inputs)
    example_inputs: Any


def plan_removal(model: nn.Module, scores: Scores, ratio: float, *, scope: str,
                 ignored_layers: Sequence[nn.Module | str], round_to: int | None, max_layer_ratio: float,
                 target: str, example_inputs: Any, min_keep: Mapping[str, int] | None = None) -> Removal:
    """Check the arguments and choose the channels to remove (arguments as in :func:`pyobc.prune`;
    ``min_keep``: group root -> channels that group keeps at least)."""
    ratio = check_prune_options(ratio, scope, target, round_to, max_layer_ratio)
    model = unwrap_model(model)
    check_scores(model, scores)
    if target == "macs" and example_inputs is None:
        raise ValueError("target='macs' needs example_inputs (to measure each layer's workload)")
    ignored = resolve_ignored(model, ignored_layers)
    costs = trace_costs(model, example_inputs) if example_inputs is not None else None
    candidates = [(g, v) for g, v in zip(scores.groups, scores.values) if not is_ignored(g, ignored)]
    groups = [g for g, _ in candidates]
    measure, total = target_measure(model, groups, target, scope=scope, costs=costs)
    remove = choose(groups, [v for _, v in candidates], ratio, scope=scope, round_to=round_to,
                    max_layer_ratio=max_layer_ratio, measure=measure, total=total, min_keep=min_keep)
    return Removal(model, scores, ratio, scope, target, remove, costs, example_inputs)


def _compensate(model: nn.Module, groups: Sequence[Group], remove: Mapping[str, torch.Tensor],
                scores: Scores) -> None:
    """Add the structured elimination-compensation bias shifts of the removed channels to their consumers."""
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


def perform_removal(removal: Removal, *, inplace: bool = False, compensate: bool = False,
                    calibration: Calibration | None = None, damping: float = 0.01,
                    progress: bool | None = None) -> tuple[nn.Module, PruneReport]:
    """Cut ``removal.remove`` from the model (a copy unless ``inplace``), record the step in the model's
    pruning plan and return ``(pruned model, report)`` (``compensate`` as in :func:`pyobc.prune`). With a
    ``calibration``, the layers that lost input channels are then refit against the unpruned model
    (:mod:`pyobc.pruning.reconstruct`; with ``inplace`` a copy of the unpruned model is kept meanwhile)."""
    model, scores, remove, costs = removal.model, removal.scores, removal.remove, removal.costs
    groups = list(scores.groups)
    signature = model_signature(model)
    params_before = count_params(model)
    macs_before = macs_from(costs, tensor_shapes(model)) if costs is not None else None

    out = model if inplace else copy.deepcopy(model)
    dense = copy.deepcopy(model) if inplace and calibration is not None else model
    if compensate:
        _compensate(out, groups, remove, scores)
    # what the cut must compute: the (compensated) model with the channels zeroed, taken before cutting
    zeroed = (zeroed_outputs(out, groups, remove, removal.example_inputs)
              if removal.example_inputs is not None else None)
    apply_remove(out, groups, remove)
    keep = {}
    layers = []
    for g in groups:
        mask = removed_mask(g, remove.get(g.root, ()))
        keep[g.root] = (~mask).nonzero().reshape(-1)
        layers.append(LayerWidth(g.root, int((~mask).sum()), g.size))
    plan.record(out, signature, groups, keep, removal.example_inputs)
    macs_after = None
    if removal.example_inputs is not None:  # also checks that the pruned model runs
        try:
            costs_after = trace_costs(out, removal.example_inputs)
        except RuntimeError as e:
            raise PrunedModelError(broken_model_message(e, groups, remove)) from e
        macs_after = macs_from(costs_after, tensor_shapes(out))
        culprits = (None if inplace else  # the unpruned model is gone after an in-place cut
                    lambda: mismatched_groups(model, groups, remove, removal.example_inputs))
        check_zeroing_equivalence(zeroed, out, removal.example_inputs, culprits)
    reconstruction = None
    if calibration is not None:  # after the check above: a broken cut is reported as such, not as a refit error
        reconstruction = refit(dense, out, plan_targets(dense, out, groups, remove), calibration, damping=damping,
                               progress=progress, skipped=not_refit(groups, remove))
    report = PruneReport(method=scores.method, ratio=removal.ratio, scope=removal.scope, target=removal.target,
                         params_before=params_before, params_after=count_params(out), macs_before=macs_before,
                         macs_after=macs_after, layers=layers,
                         removed={r: v.clone() for r, v in remove.items() if v.numel()}, compensated=compensate,
                         reconstruction=reconstruction)
    return out, report
