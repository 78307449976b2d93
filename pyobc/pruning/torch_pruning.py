"""Use any pyobc criterion as the importance of Torch-Pruning's pruners.

Torch-Pruning calls ``importance(group)`` for every group it may prune and expects one score per channel of
the group's first item (``group[0]``: the root layer and its channel indices ``group[0].idxs``). This adapter
scores the whole model with :func:`pyobc.score` the first time it is asked, finds the pyobc group that has
the same layer in the same role (out- or in-channels) and returns pyobc's scores of the corresponding root
channels. It re-scores whenever the model's parameter shapes changed since the last scoring — Torch-Pruning
prunes iteratively (``iterative_steps``), and estimates every importance of a step before pruning anything.
A group pyobc has no scores for gets ``None`` (Torch-Pruning then leaves it alone).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ..api import score
from ..layers import NORMS
from ..scoring.scores import Scores, model_signature

__all__ = ["TorchPruningImportance"]

try:  # subclass Torch-Pruning's base class when it is there (it is only an interface)
    from torch_pruning.pruner.importance import Importance as _Base
except Exception:  # pragma: no cover - torch_pruning is a dependency of pyobc
    _Base = object


class TorchPruningImportance(_Base):
    """A Torch-Pruning importance backed by :func:`pyobc.score`.

    Args:
        method: pyobc criterion name (``"jacobian"``, ``"oba"``...).
        loader: data for scoring.
        model: the model being pruned; by default the one of the dependency graph that built the group.
        **score_kwargs: passed to :func:`pyobc.score` (``max_batches``, ``loss_fn``, criterion options...).

    Attributes: ``scores`` (the latest :class:`pyobc.Scores`) and ``scorings`` (how many times it scored).

    Example:
        >>> import torch, torch_pruning as tp, pyobc
        >>> model = pyobc.models.resnet20(in_channels=1, input_size=8, width=0.25)
        >>> loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
        >>> imp = pyobc.TorchPruningImportance("jacobian", loader)
        >>> pruner = tp.pruner.BasePruner(model, torch.randn(2, 1, 8, 8), importance=imp,
        ...                               pruning_ratio=0.5, ignored_layers=[model.fc])
        >>> pruner.step()
        >>> model.conv1.out_channels
        2
    """

    def __init__(self, method: str, loader: Iterable | None, *, model: nn.Module | None = None, **score_kwargs: Any):
        self.method = method
        self.loader = loader
        self.model = model
        self.score_kwargs = score_kwargs
        self.scores: Scores | None = None
        self.scorings = 0
        self._signature: dict | None = None
        self._model_id: int | None = None
        self._roles: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _score(self, model: nn.Module) -> None:
        self.scores = score(model, self.loader, self.method, **self.score_kwargs)
        self.scorings += 1
        self._signature = model_signature(model)
        self._model_id = id(model)
        # (layer, role) -> (channel position -> root channel, root channel scores)
        self._roles = {}
        for g, v in zip(self.scores.groups, self.scores.values):
            for m in g.members:
                role = "out" if m.kind in ("out", "depthwise") else m.kind
                key = (m.module, role)
                if key in self._roles or not m.index.numel():
                    continue
                where = torch.full((int(m.index.max()) + 1,), -1, dtype=torch.long)
                where[m.index] = m.root
                self._roles[key] = (where, v)

    def __call__(self, group: Any) -> torch.Tensor | None:
        dg = getattr(group, "_DG", None)
        model = self.model if self.model is not None else getattr(dg, "model", None)
        if model is None:
            raise ValueError("TorchPruningImportance needs the model: pass model=... (the group carries no "
                             "dependency graph)")
        if self.scores is None or self._model_id != id(model) or self._signature != model_signature(model):
            self._score(model)
        dep, idxs = group[0].dep, group[0].idxs
        layer = dep.target.module
        names = {id(m): n for n, m in model.named_modules()}
        name = names.get(id(layer))
        if name is None:
            return None
        out_fn = dg.is_out_channel_pruning_fn(dep.handler) if dg is not None else True
        kind = "out" if out_fn else "in"
        if isinstance(layer, NORMS):
            kind = "norm"
        found = self._roles.get((name, kind))
        if found is None:
            return None
        where, values = found
        idxs = torch.as_tensor(list(idxs), dtype=torch.long)
        if idxs.numel() == 0 or int(idxs.max()) >= where.numel():
            return None
        roots = where[idxs]
        if bool((roots < 0).any()):
            return None
        return values[roots].to(torch.float32)
