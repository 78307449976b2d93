"""Element masks for removing channel groups without changing shapes (zeroing).

Zeroing every parameter slice of a group's channel has exactly the effect of removing the channel
(the conv output is 0, BatchNorm outputs ``0 * x_hat + 0``, consumers read nothing from it), so it is
how pyobc evaluates a removal before physical pruning, and how the oracle measures loss changes.

Example:
    >>> import torch, torch.nn as nn
    >>> from pyobc.grouping import build_groups
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> groups = build_groups(net, torch.randn(2, 4))
    >>> masks = keep_masks(groups, dict(net.named_parameters()), {"0": torch.tensor([0, 5])})
    >>> masks["0.weight"][:, 0].tolist()[:6], masks["2.weight"][0, :6].tolist()
    ([False, True, True, True, True, False], [False, True, True, True, True, False])
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .grouping import IN_AXIS, Group

__all__ = ["removed_mask", "keep_masks", "zero_channels", "lowest_channels"]


def removed_mask(group: Group, removed: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Boolean mask over the group's root channels, True where removed (IndexError when out of range).

    Example:
        >>> from pyobc.grouping import Group
        >>> removed_mask(Group("fc", 4, ()), [1, 3]).tolist()
        [False, True, False, True]
    """
    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1)
    if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= group.size):
        raise IndexError(f"group {group.root!r} has {group.size} channels; got indices {removed.tolist()}")
    mask = torch.zeros(group.size, dtype=torch.bool)
    mask[removed] = True
    return mask


def _slice_mask(mask: torch.Tensor, axis: int, groups: int, positions: torch.Tensor) -> None:
    """Clear ``positions`` along ``axis`` of ``mask`` (IN_AXIS = group-expanded input channels)."""
    if positions.numel() == 0:
        return
    if mask.dim() <= 1:
        mask[positions] = False
        return
    if axis == IN_AXIS or axis == 1:
        o, ig = mask.shape[0], mask.shape[1]
        og = o // groups
        for p in positions.tolist():  # a handful per channel: grouped convs are rare and small
            g, j = divmod(p, ig)
            mask[g * og:(g + 1) * og, j] = False
        return
    mask.index_fill_(axis % mask.dim(), positions, False)


def keep_masks(groups: Sequence[Group], params: Mapping[str, torch.Tensor],
               remove: Mapping[str, torch.Tensor | Sequence[int]]) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (shaped like each touched parameter) that remove ``remove[root]`` channels.

    ``remove`` maps a group's root module name to the root channel indices to remove.
    """
    by_root = {g.root: g for g in groups}
    masks: dict[str, torch.Tensor] = {}
    for root, channels in remove.items():
        if root not in by_root:
            raise KeyError(f"no group is rooted at {root!r}")
        group = by_root[root]
        chosen = removed_mask(group, channels)
        for member in group.members:
            for s in member.slices:
                mask = masks.get(s.param)
                if mask is None:
                    mask = masks[s.param] = torch.ones(params[s.param].shape, dtype=torch.bool)
                _slice_mask(mask, s.axis, s.groups, s.index[chosen[s.root]])
    return masks


def zero_channels(model: nn.Module, groups: Sequence[Group], remove: Mapping[str, torch.Tensor | Sequence[int]],
                  inplace: bool = False) -> nn.Module:
    """Zero every parameter slice of the ``remove`` channels; returns a copy unless ``inplace``."""
    target = model if inplace else copy.deepcopy(model)
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, mask in keep_masks(groups, params, remove).items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return target


def lowest_channels(values: Sequence[torch.Tensor], groups: Sequence[Group], fraction: float) -> dict[str, torch.Tensor]:
    """Per group, the ``fraction`` of channels with the lowest scores (at least one channel is kept)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    out = {}
    for g, v in zip(groups, values):
        k = min(int(round(fraction * g.size)), g.size - 1)
        out[g.root] = torch.argsort(v, stable=True)[:k]
    return out
