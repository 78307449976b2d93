"""Torch-Pruning's group search, bounded in time and memory, with progress.

``DependencyGraph.get_all_groups`` expands one root layer's channel indices through every reshape,
concatenation and split of the traced graph. Two things make that blow up on real models, both measured:

* reshapes that fold spatial positions into the channel axis (Swin's window partition, mobilevit's
  unfold) map each channel index to ``stride`` indices, and chains of them multiply: on torchvision's
  ``swin_t`` at 64 px the index lists grew past 16 GB within minutes;
* the search of a root is repeated for every root, so a graph with many such paths is slow on every call
  (mobilevitv2: 34 s), and grouped-query attention (fewer key/value heads than query heads) sent a
  Llama's search through the key/value projections for over ten minutes.

pyobc never asks for groups rooted at layers whose width it must keep anyway (ignored layers and
attention projections, see :mod:`pyobc.attention_heads`), which removes the attention cases, and runs the
search itself root by root (:func:`search_groups`) with a guard on every index mapping of *its own*
graph instance (Torch-Pruning itself is not patched), and the graph's index mappings are computed once
instead of once per root (:class:`_MappingsDone`): a mapping that returns more indices than any
tensor axis of the model has (times 4) abandons that root's group, which is reported as refused, and a
search that exceeds its time budget stops with an error naming the model and the root it was at.

Example:
    >>> import torch, torch.nn as nn
    >>> from pyobc.grouping import build_groups
    >>> len(build_groups(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4)))
    1
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

import torch.nn as nn

from .errors import GroupSearchTimeout
from .progress import progress_bar

__all__ = ["SEARCH_SECONDS", "GroupSearchTimeout", "search_groups"]

#: default time budget of one model's group search, in seconds
SEARCH_SECONDS = 120.0


class _Blowup(Exception):
    """An index mapping produced more indices than the model has positions on any axis."""


class _Guard:
    """The time budget and index limit shared by every guarded mapping of one search."""

    def __init__(self, seconds: float, limit: int):
        self.deadline = time.perf_counter() + seconds
        self.seconds = seconds
        self.limit = limit
        self.root = ""

    def wrap(self, mapping: Callable) -> Callable:
        def guarded(idxs: Any) -> Any:
            if time.perf_counter() > self.deadline:
                raise GroupSearchTimeout(self.root)
            out = mapping(idxs)
            if len(out) > self.limit:
                raise _Blowup(self.root)
            return out
        return guarded


class _GuardedMappings(list):
    """A dependency's ``index_mapping`` list whose iteration yields guarded mappings (Torch-Pruning
    assigns new mappings by item, which this list keeps as they are)."""

    guard: _Guard

    def __iter__(self) -> Iterator[Any]:
        for mapping in list.__iter__(self):
            yield None if mapping is None else self.guard.wrap(mapping)


class _MappingsDone(dict):
    """``DependencyGraph.module2node`` once its index mappings are set (``build_dependency`` sets them).

    ``get_pruning_group`` recomputes every mapping of the graph before each root's search
    (``index_mapping.update_index_mapping``, which walks ``module2node.items()``): the same values each
    time, but it cost 0.4 s per root on swin_t (30 of its 40 s of grouping). Its only reader of
    ``items()`` is that function, so this mapping hides its items from it; lookups are unchanged.
    """

    def items(self):  # type: ignore[override]
        return iter(())


def _install(dg: Any, guard: _Guard) -> None:
    dg.module2node = _MappingsDone(dg.module2node)
    for node in dg.module2node.values():
        for dep in node.dependencies:
            guarded = _GuardedMappings(dep.index_mapping)
            guarded.guard = guard
            dep.index_mapping = guarded


def _index_limit(model: nn.Module) -> int:
    """4 x the longest axis of any parameter (at least 4096): more indices than that is no channel list."""
    longest = max((max(p.shape) for p in model.parameters() if p.dim()), default=1)
    return max(4096, 4 * int(longest))


def search_groups(dg: Any, model: nn.Module, names: dict[int, str], roots: tuple[type, ...],
                  skip: Sequence[nn.Module], *, seconds: float = SEARCH_SECONDS,
                  progress: bool = False) -> tuple[list[Any], list[str]]:
    """Torch-Pruning groups of ``dg`` rooted at layers of types ``roots`` (not in ``skip``), as
    ``get_all_groups`` would give them, and the names of the roots whose search was abandoned because
    its index lists exploded. Raises :class:`GroupSearchTimeout` (naming the model, the root and what
    to do) past ``seconds``."""
    guard = _Guard(seconds, _index_limit(model))
    _install(dg, guard)
    skip_ids = {id(m) for m in skip}
    candidates = [m for m in dg.module2node if isinstance(m, roots) and id(m) not in skip_ids]
    groups, refused, covered = [], [], set()
    bar = progress_bar(candidates, progress, desc="pyobc grouping", unit="layer", leave=False)
    for m in bar:
        pruner = dg.get_pruner_of_module(m)
        if id(m) in covered or pruner is None or pruner.get_out_channels(m) is None:
            continue
        guard.root = names.get(id(m), type(m).__name__)
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except _Blowup:
            refused.append(guard.root)
            continue
        except GroupSearchTimeout:
            raise GroupSearchTimeout(
                f"grouping {type(model).__name__} took over {seconds:g} s in Torch-Pruning's dependency search "
                f"(at layer {guard.root!r}, {len(groups)} groups found so far): pass the layers around it in "
                "ignored_layers (or example inputs of a smaller size)") from None
        outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
        covered.update(id(t) for t in outs)
        if not any(id(t) in skip_ids for t in outs):
            groups.append(group)
    return groups, refused
