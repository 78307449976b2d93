"""What a pruning call did: parameter and MAC counts before and after, and each group's width."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["LayerWidth", "PruneReport"]


@dataclasses.dataclass(frozen=True)
class LayerWidth:
    """One group: its root layer, the channels kept and the channels it had."""

    root: str
    kept: int
    total: int


def _fmt(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _pct(before: int | None, after: int | None) -> str:
    if before is None or after is None or before == 0:
        return "n/a"
    return f"-{(before - after) / before:.1%}"


@dataclasses.dataclass
class PruneReport:
    """Returned by :func:`pyobc.prune` (and per step by :class:`pyobc.Pruner`).

    ``params_*`` count every parameter; ``macs_*`` are multiply-accumulates per input sample of the conv,
    linear and attention layers, measured with pyobc's forward hooks (:mod:`pyobc.pruning.counting`) on
    ``example_inputs`` (None without them). ``removed`` maps each group root to the root channels removed
    (indices of the model that was pruned).

    Example:
        >>> # pruned, report = pyobc.prune(model, scores, 0.5, example_inputs=x)
        >>> # print(report)                   # a table: totals, then kept/total channels per layer
        >>> # report.params_after / report.params_before
    """

    method: str
    ratio: float
    scope: str
    target: str
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    layers: list[LayerWidth]
    removed: dict[str, torch.Tensor]
    compensated: bool = False
    #: a :class:`~pyobc.pruning.reconstruct.ReconstructionReport` when the call refit layers, else None
    reconstruction: Any = None
    counter: str = "pyobc forward hooks: conv, linear, attention"

    @property
    def channels_before(self) -> int:
        return sum(r.total for r in self.layers)

    @property
    def channels_after(self) -> int:
        return sum(r.kept for r in self.layers)

    def __str__(self) -> str:
        lines = [f"pyobc.prune: {self.method} scores, {self.scope} scope, target {self.target} "
                 f"ratio {self.ratio:g}" + (", EC bias compensation" if self.compensated else ""),
                 "",
                 "| quantity | before | after | change |",
                 "|---|---:|---:|---:|",
                 f"| channels | {self.channels_before} | {self.channels_after} | "
                 f"{_pct(self.channels_before, self.channels_after)} |",
                 f"| params | {_fmt(self.params_before)} | {_fmt(self.params_after)} | "
                 f"{_pct(self.params_before, self.params_after)} |",
                 f"| MACs/sample | {_fmt(self.macs_before)} | {_fmt(self.macs_after)} | "
                 f"{_pct(self.macs_before, self.macs_after)} |",
                 "",
                 "| layer (group root) | kept | total | kept % |",
                 "|---|---:|---:|---:|"]
        for r in self.layers:
            lines.append(f"| {r.root} | {r.kept} | {r.total} | {r.kept / max(1, r.total):.0%} |")
        lines.append("")
        lines.append(f"(MACs counted by {self.counter})")
        if self.reconstruction is not None:
            lines += ["", str(self.reconstruction)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PruneReport(channels {self.channels_before}->{self.channels_after}, params "
                f"{self.params_before}->{self.params_after}, MACs {self.macs_before}->{self.macs_after})")
