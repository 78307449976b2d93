"""``pyobc.Pruner``: iterative pruning (score, prune, fine-tune, repeat)."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..api import score
from ..model_state import unwrap_model
from .counting import count_params, macs_from, tensor_shapes, trace_costs
from .ignored import is_ignored, resolve_ignored
from .reconstruct import calibration_for, check_selection, selection_scores
from .removal import perform_removal, plan_removal
from .report import PruneReport
from .validation import check_prune_options

__all__ = ["Pruner"]

SCHEDULES = ("linear", "geometric")


class Pruner:
    """Prune in ``steps`` rounds; each round re-scores the current (already pruned) model.

    After step ``t`` the model has lost the scheduled fraction of its *original* size:
    ``linear``: ``ratio * t / steps``; ``geometric``: ``1 - (1 - ratio) ** (t / steps)`` (the same fraction of
    what is left at every step). The size is the ``target`` quantity (channels of the groups, parameters or
    MACs). ``max_layer_ratio`` also refers to each group's original width. ``finetune(model, step)`` is
    called after every step (the last one included), e.g. a few epochs of :func:`pyobc.models.train`.

    Args:
        model: the model to prune (copied unless ``inplace``).
        loader: data for scoring (and the default example inputs: two samples of its first batch).
        method: criterion name (see :func:`pyobc.methods`).
        steps, ratio, schedule: the schedule above.
        finetune: optional callback ``finetune(model, step)`` (step counts from 1).
        scope, target, ignored_layers, round_to, max_layer_ratio, compensate, example_inputs: as in
            :func:`pyobc.prune`.
        reconstruct, reconstruct_batches, damping, reconstruct_loss_fn, selection: as in :func:`pyobc.prune`:
            every step refits the layers that lost inputs against the model as it was before that step (the
            calibration batches are read once and kept).
        **score_kwargs: passed to :func:`pyobc.score` (``max_batches``, ``loss_fn``, criterion options...).

    Example:
        >>> import pyobc
        >>> model = pyobc.models.resnet20(in_channels=1, input_size=16, width=0.5)
        >>> loader = pyobc.datasets.digits("train", batch_size=64, image_size=16)
        >>> tune = lambda m, step: pyobc.models.train(m, loader, epochs=1, lr=0.01)
        >>> pruner = pyobc.Pruner(model, loader, "jacobian", steps=3, ratio=0.5, finetune=tune,
        ...                       max_batches=4)                                   # doctest: +SKIP
        >>> small, reports = pruner.run()                                          # doctest: +SKIP
        >>> print(reports[-1])                                                     # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, loader: Iterable, method: str = "jacobian", *, steps: int, ratio: float,
                 schedule: str = "linear", finetune: Callable[[nn.Module, int], Any] | None = None,
                 scope: str = "global", target: str = "channels", ignored_layers: Sequence[nn.Module | str] = (),
                 round_to: int | None = None, max_layer_ratio: float = 0.95, compensate: bool = False,
                 example_inputs: Any = None, inplace: bool = False, reconstruct: Iterable | None = None,
                 reconstruct_batches: int | None = 8, damping: float = 0.01,
                 reconstruct_loss_fn: Callable | None = None, selection: str = "scores", **score_kwargs: Any):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if finetune is not None and not callable(finetune):
            raise TypeError("finetune must be a callable finetune(model, step) or None")
        self.ratio = check_prune_options(ratio, scope, target, round_to, max_layer_ratio)
        self.steps, self.schedule, self.finetune = steps, schedule, finetune
        self.scope, self.target, self.round_to = scope, target, round_to
        self.max_layer_ratio, self.compensate = max_layer_ratio, compensate
        self.loader, self.method, self.score_kwargs = loader, method, score_kwargs
        model = unwrap_model(model)
        self.model = model if inplace else copy.deepcopy(model)
        names = resolve_ignored(self.model, ignored_layers)
        self.ignored_layers = sorted(names)  # names survive pruning (modules are not replaced)
        if example_inputs is None:
            batch = next(iter(loader))
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            example_inputs = x[:2] if isinstance(x, torch.Tensor) else None
        self.example_inputs = example_inputs
        self.calibration = calibration_for(self.model, reconstruct, reconstruct_batches, reconstruct_loss_fn)
        self.damping, self.selection = damping, selection
        check_selection(selection, self.calibration, damping)
        self.reports: list[PruneReport] = []
        self.step_count = 0
        self._original: float | None = None
        self._original_sizes: dict[str, int] = {}

    def ratio_at(self, step: int) -> float:
        """Fraction of the original size removed after ``step`` (0 <= step <= steps)."""
        t = step / self.steps
        if self.schedule == "linear":
            return self.ratio * t
        return 1.0 - (1.0 - self.ratio) ** t

    def _quantity(self, scores) -> float:
        names = set(self.ignored_layers)
        if self.target == "channels":
            return float(sum(g.size for g in scores.groups if not is_ignored(g, names)))
        if self.target == "params":
            return float(count_params(self.model))
        if self.example_inputs is None:
            raise ValueError("target='macs' needs example_inputs")
        return float(macs_from(trace_costs(self.model, self.example_inputs), tensor_shapes(self.model)))

    def step(self) -> PruneReport:
        """Score the current model, prune it to the next scheduled ratio, fine-tune; returns the report."""
        if self.step_count >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done")
        scores = score(self.model, self.loader, self.method, **self.score_kwargs)
        now = self._quantity(scores)
        scores = selection_scores(self.model, scores, self.selection, self.calibration, damping=self.damping,
                                  ignored_layers=self.ignored_layers)
        if self._original is None:
            self._original = now
            self._original_sizes = {g.root: g.size for g in scores.groups}
        t = self.step_count + 1
        goal_left = (1.0 - self.ratio_at(t)) * self._original
        step_ratio = min(max(0.0, 1.0 - goal_left / now), 1.0 - 1e-9) if now > 0 else 0.0
        min_keep = {root: max(1, math.ceil((1.0 - self.max_layer_ratio) * size - 1e-9))
                    for root, size in self._original_sizes.items()}
        # max_layer_ratio refers to the original widths: min_keep carries it, so this step's own limit is off
        removal = plan_removal(self.model, scores, step_ratio, scope=self.scope, ignored_layers=self.ignored_layers,
                               round_to=self.round_to, max_layer_ratio=1.0, target=self.target,
                               example_inputs=self.example_inputs, min_keep=min_keep)
        self.model, report = perform_removal(removal, inplace=True, compensate=self.compensate,
                                             calibration=self.calibration, damping=self.damping)
        self.step_count = t
        self.reports.append(report)
        if self.finetune is not None:
            self.finetune(self.model, t)
        return report

    def run(self) -> tuple[nn.Module, list[PruneReport]]:
        """Run the remaining steps; returns ``(pruned model, per-step reports)``."""
        while self.step_count < self.steps:
            self.step()
        return self.model, list(self.reports)
