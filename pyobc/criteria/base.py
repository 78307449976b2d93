"""What every criterion shares: options, additive accumulators, gradients and per-sample passes.

A criterion accumulates *additive* tensors per batch in ``self.acc`` (sums and counts), so that
data-parallel scoring only has to all-reduce them (:mod:`pyobc.distributed`), and turns them into
scores in :meth:`Criterion.finalize`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..nested import tensors_in
from ..scoring.context import Batch, Context

__all__ = ["Criterion", "Result", "validate_micro_batch", "tensors_requiring_grad", "model_outputs"]


@dataclasses.dataclass
class Result:
    """Scores of one criterion: per-group channel vectors, optional per-parameter tensors, extras."""

    channel: list[torch.Tensor]
    parameter: dict[str, torch.Tensor] | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


def validate_micro_batch(name: str, value: Any) -> None:
    """The ``micro_batch`` option: a positive int or None."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"method {name!r}: option micro_batch must be a positive integer or None, got {value!r}")


class Criterion:
    """Base class of scoring criteria. Subclasses set the class attributes and implement
    :meth:`update` (one batch) and :meth:`finalize`."""

    name: ClassVar[str]
    description: ClassVar[str]
    granularities: ClassVar[tuple[str, ...]] = ("channel",)
    needs_data: ClassVar[bool] = True
    #: measures rather than estimates (the oracle): left out of default comparisons and the demo
    evaluation_only: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, ctx: Context, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise TypeError(f"method {self.name!r} got unexpected option(s) {unknown}; valid options: {valid}")
        self.ctx = ctx
        self.opts = {**self.defaults, **options}
        self.acc: dict[str, torch.Tensor] = {}
        self.validate()

    def validate(self) -> None:
        """Check ``self.opts``; raise ValueError/TypeError naming a bad option."""

    def _choice(self, key: str, choices: tuple) -> Any:
        value = self.opts[key]
        if value not in choices:
            raise ValueError(f"method {self.name!r}: option {key}={value!r} must be one of {choices}")
        return value

    # -- accumulators ----------------------------------------------------------------------------------
    def add(self, key: str, value: torch.Tensor | float) -> None:
        """Add to the additive accumulator ``key`` (created on first use)."""
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value), dtype=torch.float64, device=self.ctx.device)
        value = value.detach()
        if key in self.acc:
            self.acc[key] += value
        else:
            self.acc[key] = value.clone()

    def count(self, key: str) -> float:
        return float(self.acc[key]) if key in self.acc else 0.0

    # -- per-weight scores (granularity="weight") -------------------------------------------------------
    @property
    def per_weight(self) -> bool:
        """Whether per-parameter scores are asked for (``granularity="weight"``)."""
        return self.ctx.granularity == "weight"

    def add_weight_scores(self, scores: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """Accumulate per-parameter scores; ``scores`` is only called when they are asked for."""
        if self.per_weight:
            for name, value in scores().items():
                self.add(f"weight:{name}", value)

    def weight_scores(self, divisor: float = 1.0,
                      compute: Callable[[], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor] | None:
        """The per-parameter scores of :class:`Result`: ``None`` unless asked for; else ``compute()``,
        or the accumulated :meth:`add_weight_scores` divided by ``divisor``."""
        if not self.per_weight:
            return None
        if compute is not None:
            return compute()
        return {n: self.acc[f"weight:{n}"] / divisor for n in self.ctx.params}

    def update(self, batch: Batch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared computations ---------------------------------------------------------------------------
    def wanted_params(self) -> list[str]:
        """Parameters whose gradients the criterion needs: the grouped ones, or all for weight scores."""
        if self.per_weight:
            return list(self.ctx.params)
        return self.ctx.member_params()

    def gradients(self, batch: Batch, names: list[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Batch loss and its gradient w.r.t. ``names`` (zeros where the loss does not depend on one)."""
        names = self.wanted_params() if names is None else names
        loss = self.ctx.loss(batch)
        leaves = [self.ctx.params[n] for n in names]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss, {n: (g if g is not None else torch.zeros_like(p)) for n, p, g in zip(names, leaves, grads)}

    def channels(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Member-channel sums of ``a * b`` over every group's parameter slices."""
        layout = self.ctx.layout
        return layout.members(layout.sources(a, b))


def tensors_requiring_grad(obj: Any) -> list[torch.Tensor]:
    """Every tensor that requires grad in a model's (nested) output, in order: the outputs a
    second-order pass differentiates through."""
    return [t for t in tensors_in(obj) if t.requires_grad]


def model_outputs(outputs: Any) -> list[torch.Tensor]:
    """The model outputs a loss is a function of, for criteria that linearise or take curvature at them:
    every tensor in the model's (nested) output that requires grad and has a batch dimension. A scalar the
    model returns is a loss it computed itself (the Hugging Face ``labels=`` idiom), not an output:
    linearising around it would add the loss's own Hessian to OBA's inter-layer term."""
    return [t for t in tensors_requiring_grad(outputs) if t.dim() > 0]
