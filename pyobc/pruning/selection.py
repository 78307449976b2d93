"""Which channels to remove: ranking, per-group limits and targets.

Scope ``"global"`` ranks every candidate channel of every group together (ascending score, ties broken by
group order then channel) and gives each group as many removals as it has channels among the ``N`` lowest;
``"local"`` removes ``round(f * size)`` channels from every group. The per-group limits then apply, in
this order: at most ``floor(max_layer_ratio * size)`` removed and at least ``min_keep`` (>= 1) kept; the kept
count rounded *up* to a multiple of ``lcm(round_to, group.divisor)`` (or the group left whole when no such
multiple fits). Inside a group the lowest-scored channels go, except in groups with attention heads, which
lose the same number of channels from every head (the lowest-scored of each head), so that heads keep
equal widths and channels stay in their heads; grouped convolutions likewise lose the same number of
channels from each of their groups.

``N`` (or ``f``) is the smallest value whose *measured* reduction of the target quantity (channels,
parameters or MACs, computed from the pruned shapes) reaches the requested ratio: a bisection, since every
step above is monotone; :func:`target_measure` gives that measurement for a model.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..grouping import Group, channel_buckets
from .counting import LayerCost, count_params, macs_from, tensor_shapes
from .slicing import cuts, shapes_after

__all__ = ["head_of_channel", "target_measure", "choose"]

#: the head (or convolution group) of each root channel: :func:`pyobc.grouping.channel_buckets`
head_of_channel = channel_buckets

#: ``measure(removal)``: the target quantity left once ``removal`` (root -> removed root channels) is cut
Measure = Callable[[Mapping[str, torch.Tensor]], float]


def target_measure(model: nn.Module, groups: Sequence[Group], target: str, *, scope: str,
                   costs: list[LayerCost] | None = None) -> tuple[Measure | None, float]:
    """``(measure, total)`` for :func:`choose`: how much of ``target`` a removal from ``groups`` leaves, and
    how much there is now. Parameters and MACs are computed from the shapes the removal would give, without
    cutting anything; ``costs`` (from :func:`~pyobc.pruning.counting.trace_costs`) are needed for ``"macs"``.
    The measure is None for ``target="channels"`` with ``scope="local"``, which needs no search.

    Example:
        >>> import torch, torch.nn as nn
        >>> from pyobc.grouping import build_groups
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> groups = build_groups(net, torch.randn(2, 4))
        >>> measure, total = target_measure(net, groups, "params", scope="global")
        >>> total, measure({"0": torch.tensor([0, 1])})
        (58.0, 44.0)
    """
    if target == "channels":
        total = float(sum(g.size for g in groups))
        if scope == "local":
            return None, total
        return (lambda removal: total - sum(int(r.numel()) for r in removal.values())), total
    shapes = tensor_shapes(model)

    def after(removal: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return shapes_after(shapes, cuts(model, groups, removal, shapes=shapes)[0])

    if target == "params":
        params = {n for n, _ in model.named_parameters()}
        return (lambda removal: float(sum(math.prod(s) for n, s in after(removal).items() if n in params)),
                float(count_params(model)))
    return (lambda removal: float(macs_from(costs, after(removal)))), float(macs_from(costs, shapes))


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _allowed(n: int, size: int, multiple: int, max_layer_ratio: float, min_keep: int) -> int:
    cap = min(int(math.floor(max_layer_ratio * size + 1e-9)), size - max(1, min_keep))
    n = max(0, min(n, cap))
    if n == 0:
        return 0
    kept = -(-(size - n) // multiple) * multiple
    return max(0, size - kept) if kept < size else 0


def _pick(values: torch.Tensor, n: int, heads: torch.Tensor | None, divisor: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if heads is None:
        return torch.sort(torch.argsort(values, stable=True)[:n]).values
    per = n // divisor
    out = []
    for h in range(divisor):
        idx = (heads == h).nonzero().reshape(-1)
        out.append(idx[torch.argsort(values[idx], stable=True)[:per]])
    return torch.sort(torch.cat(out)).values


def choose(groups: Sequence[Group], values: Sequence[torch.Tensor], ratio: float, *, scope: str,
           round_to: int | None, max_layer_ratio: float,
           measure: Measure | None,
           total: float, min_keep: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Root -> removed root channels (sorted) such that ``total - measure(removal) >= ratio * total``.

    ``measure(removal)`` returns the target quantity after removing ``removal``; a warning says when the
    limits stop the target from being reached (the largest allowed removal is returned then). With
    ``scope="local"`` and ``measure=None``, every group removes ``round(ratio * size)`` channels (then the
    limits apply), without a search.
    """
    min_keep = dict(min_keep or {})
    heads = [head_of_channel(g) for g in groups]
    mults = [math.lcm(int(round_to or 1), int(g.divisor)) for g in groups]
    vals = [v.detach().to("cpu", torch.float64).reshape(-1) for v in values]
    for g, v in zip(groups, vals):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"group {g.root!r} has non-finite scores")

    def removal(counts: Sequence[int]) -> dict[str, torch.Tensor]:
        return {g.root: _pick(v, _allowed(n, g.size, m, max_layer_ratio, min_keep.get(g.root, 1)), h, g.divisor)
                for g, v, n, h, m in zip(groups, vals, counts, heads, mults)}

    goal = ratio * total
    if ratio <= 0 or not groups:
        return {g.root: torch.zeros(0, dtype=torch.long) for g in groups}
    if scope == "local" and measure is None:  # the same fraction of every group
        return removal([_round(ratio * g.size) for g in groups])

    if scope == "global":
        flat = torch.cat(vals)
        owner = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(groups)])
        order = torch.argsort(flat, stable=True)
        ranked_owner = owner[order]

        def counts_at(level: int) -> list[int]:
            return torch.bincount(ranked_owner[:level], minlength=len(groups)).tolist()

        lo, hi = 0, int(flat.numel())
    else:
        def counts_at(level: int) -> list[int]:
            f = level / 10000.0
            return [_round(f * g.size) for g in groups]

        lo, hi = 0, 10000

    cache: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    def reduction(level: int) -> tuple[float, dict[str, torch.Tensor]]:
        if level not in cache:
            r = removal(counts_at(level))
            cache[level] = (total - measure(r), r)
        return cache[level]

    best_hi, r_hi = reduction(hi)
    if best_hi + 1e-9 * max(1.0, total) < goal:
        warnings.warn(f"the limits (max_layer_ratio={max_layer_ratio}, round_to={round_to}, heads, at least one "
                      f"channel per group) allow removing {best_hi / total:.1%} of the target quantity, less than "
                      f"the requested {ratio:.1%}", RuntimeWarning, stacklevel=3)
        return r_hi
    while lo < hi:  # smallest level whose reduction reaches the goal
        mid = (lo + hi) // 2
        if reduction(mid)[0] + 1e-9 * max(1.0, total) >= goal:
            hi = mid
        else:
            lo = mid + 1
    return reduction(lo)[1]
