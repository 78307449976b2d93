"""The result of :func:`pyobc.score`: per-channel scores of every prunable group.

Higher means more important. A :class:`Scores` holds plain tensors, strings and numbers only, so a saved
file loads with ``torch.load(path, weights_only=True)``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from ..grouping import Group

__all__ = ["Scores", "model_signature"]

_FORMAT = "pyobc.scores/1"


def model_signature(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape: identifies the architecture (and pruning state) scores belong to."""
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


class Scores:
    """Per-channel importance of each prunable group.

    Attributes:
        method: criterion name; ``options`` its options.
        groups: the scored :class:`~pyobc.grouping.Group` records (members, channel maps).
        values: one 1-D float tensor per group, one entry per root channel (higher = keep).
        batches, samples: how much data the scores saw.
        parameter_scores: with ``granularity="weight"``, raw per-element scores per parameter.
        extras: method-specific tensors (e.g. elimination-compensation bias shifts).
        signature: parameter name -> shape of the scored model.

    Example:
        >>> import torch, torch.nn as nn, pyobc
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> s = pyobc.score(net, None, "magnitude", example_inputs=torch.randn(2, 4))
        >>> list(s.by_module()), s.by_module()["0"].shape
        (['0'], torch.Size([8]))
    """

    def __init__(
        self,
        method: str,
        groups: Sequence[Group],
        values: Sequence[torch.Tensor],
        *,
        options: Mapping[str, Any] | None = None,
        batches: int = 0,
        samples: int = 0,
        granularity: str = "channel",
        parameter_scores: Mapping[str, torch.Tensor] | None = None,
        extras: Mapping[str, Any] | None = None,
        signature: Mapping[str, tuple[int, ...]] | None = None,
        seconds: float | None = None,
    ):
        if len(groups) != len(values):
            raise ValueError(f"{len(groups)} groups but {len(values)} score vectors")
        for g, v in zip(groups, values):
            if v.dim() != 1 or v.numel() != g.size:
                raise ValueError(f"group {g.root!r}: expected {g.size} scores, got shape {tuple(v.shape)}")
        self.method = method
        self.groups = list(groups)
        self.values = [v.detach().to("cpu", torch.float32) if v.dtype != torch.float64 else v.detach().cpu()
                       for v in values]
        self.options = dict(options or {})
        self.batches = int(batches)
        self.samples = int(samples)
        self.granularity = granularity
        self.parameter_scores = None if parameter_scores is None else {
            k: v.detach().cpu() for k, v in parameter_scores.items()}
        self.extras = dict(extras or {})
        self.signature = dict(signature or {})
        self.seconds = seconds

    # -- views -------------------------------------------------------------------------------------
    def by_module(self) -> dict[str, torch.Tensor]:
        """Root module name -> 1-D per-channel scores (length = the root's out-channels).

        Example:
            >>> # scores.by_module()["layer1.0.conv1"].argsort()[:4]  -> the 4 least important channels
        """
        return {g.root: v for g, v in zip(self.groups, self.values)}

    def by_parameter(self) -> dict[str, torch.Tensor]:
        """Parameter name -> raw per-element scores shaped like the parameter (``granularity="weight"``).

        Raw means: averaged over batches as the method defines, no abs, no normalisation.
        """
        if self.parameter_scores is None:
            raise ValueError(
                f"these {self.method!r} scores have granularity {self.granularity!r}; "
                "score with granularity='weight' to get per-parameter scores")
        return dict(self.parameter_scores)

    def group(self, root: str) -> tuple[Group, torch.Tensor]:
        """The group rooted at module ``root`` and its scores."""
        for g, v in zip(self.groups, self.values):
            if g.root == root:
                return g, v
        raise KeyError(f"no scored group is rooted at {root!r}; roots: {[g.root for g in self.groups][:8]}...")

    def ranking(self) -> list[tuple[str, int, float]]:
        """Every (root module, channel, score), least important first (a global ranking)."""
        rows = [(g.root, c, float(s)) for g, v in zip(self.groups, self.values) for c, s in enumerate(v.tolist())]
        return sorted(rows, key=lambda r: r[2])

    @property
    def num_channels(self) -> int:
        return sum(g.size for g in self.groups)

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "method": self.method,
            "options": {k: v for k, v in self.options.items() if isinstance(v, (int, float, str, bool, type(None)))},
            "groups": [g.to_dict() for g in self.groups],
            "values": self.values,
            "batches": self.batches,
            "samples": self.samples,
            "granularity": self.granularity,
            "parameter_scores": self.parameter_scores,
            "extras": self.extras,
            "signature": {k: list(v) for k, v in self.signature.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scores":
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a pyobc scores file (format {d.get('format')!r}, expected {_FORMAT!r})")
        return cls(
            d["method"], [Group.from_dict(g) for g in d["groups"]], d["values"],
            options=d["options"], batches=d["batches"], samples=d["samples"], granularity=d["granularity"],
            parameter_scores=d["parameter_scores"], extras=d["extras"],
            signature={k: tuple(v) for k, v in d["signature"].items()}, seconds=d.get("seconds"))

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores; the file loads with ``torch.load(path, weights_only=True)``."""
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scores":
        """Read scores written by :meth:`save` (safe: ``weights_only=True``)."""
        return cls.from_dict(torch.load(path, weights_only=True, map_location="cpu"))

    # -- display -----------------------------------------------------------------------------------
    def __repr__(self) -> str:
        means = sorted(((float(v.mean()) if v.numel() else 0.0, g.root) for g, v in zip(self.groups, self.values)),
                       reverse=True)
        fmt = (lambda rows: ", ".join(f"{r} ({m:.3g})" for m, r in rows))
        data = f"{self.batches} batches, {self.samples} samples" if self.batches else "no data"
        lines = [f"Scores(method={self.method!r}, groups={len(self.groups)}, channels={self.num_channels}, {data})"]
        if means:
            lines.append(f"  most important layers (mean score): {fmt(means[:3])}")
            lines.append(f"  least important layers (mean score): {fmt(means[-3:][::-1])}")
        return "\n".join(lines)
