"""What every criterion shares: options, additive accumulators, gradients and per-sample passes.

A criterion accumulates *additive* tensors per batch in ``self.acc`` (sums and counts), so that
data-parallel scoring only has to all-reduce them (:mod:`pyobc.distributed`), and turns them into
scores in :meth:`Criterion.finalize`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from ..scoring.capture import Record
from ..scoring.engine import Batch, Context
from ..scoring.per_sample import activation_rows, per_sample_grads, sq_grad_sums, supports_activation_rows
from ..grouping import IN_AXIS

__all__ = ["Criterion", "Result", "PerSamplePass", "validate_micro_batch"]


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

    def update(self, batch: Batch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared computations ---------------------------------------------------------------------------
    def wanted_params(self) -> list[str]:
        """Parameters whose gradients the criterion needs: the grouped ones, or all for weight scores."""
        if self.ctx.granularity == "weight":
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


class PerSamplePass:
    """One forward pass recording the layers per-sample criteria need, and what follows from it.

    ``params`` are the qualified parameter names whose per-sample gradients may be asked for. Each is
    served by the nearest module that was called (its owner, else an ancestor; the model itself for
    bare parameters) — closed forms for linear/conv/norm layers, a vmap of that module otherwise.

    Example (inside a criterion's ``update``)::

        sp = PerSamplePass(self.ctx, batch, params=self.ctx.member_params())
        fisher = sp.sq_grad_sums()          # {param: sum_n grad_n^2}
        rows = sp.member_rows()             # (N, members) Jacobian rows of single samples
    """

    def __init__(self, ctx: Context, batch: Batch, params: list[str], rows: bool = False):
        self.ctx = ctx
        self.batch = batch
        self.params = list(params)
        self._owner = {p: self._candidates(p) for p in self.params}
        self._row_members = []
        fallback: list[str] = []  # parameters of members whose rows need per-sample gradients
        watch: dict[str, nn.Module] = {}
        if rows:
            for gi, g in enumerate(ctx.groups):
                for mi, m in enumerate(g.members):
                    module = ctx.modules.get(m.module)
                    if module is not None and m.module in ctx.called and supports_activation_rows(m.kind, module):
                        watch[m.module] = module
                        self._row_members.append((gi, mi, m, module))
                    else:
                        fallback.extend(s.param for s in m.slices)
        # watch only the module that will serve each parameter (the nearest one that runs)
        for p in dict.fromkeys(self.params + fallback):
            cands = self._candidates(p)
            name = next((c for c in cands if c in ctx.called), cands[-1])
            watch[name] = ctx.modules[name]
        self.loss, self.capture = ctx.capture_forward(batch, watch)
        self.scale = float(batch.size)  # mean-loss gradient -> per-sample-loss gradient
        outs = self.capture.outputs()
        # rows need the graph again (input gradients through single layers, per-sample fallbacks)
        grads = torch.autograd.grad(self.loss, [y for _, _, y in outs], allow_unused=True, retain_graph=rows)
        self.grad_out: dict[tuple[str, int], torch.Tensor | None] = {
            (name, k): g for (name, k, _), g in zip(outs, grads)}

    def _candidates(self, param: str) -> list[str]:
        """Owner module of ``param`` and its ancestors, nearest first (the root model is '')."""
        parts = param.split(".")[:-1]
        return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]

    def _serving_module(self, param: str) -> tuple[str, str]:
        """(module name, parameter name local to it) of the nearest called module owning ``param``."""
        for name in self._owner[param]:
            if self.capture.records.get(name):
                local = param[len(name) + 1:] if name else param
                return name, local
        raise RuntimeError(f"no module owning parameter {param!r} was called in the forward pass")

    def _calls(self, name: str) -> list[tuple[Record, list]]:
        return [(r, [self.grad_out.get((name, k))]) for k, r in enumerate(self.capture.records[name])]

    def _by_module(self) -> dict[str, list[tuple[str, str]]]:
        served: dict[str, list[tuple[str, str]]] = {}
        for p in self.params:
            name, local = self._serving_module(p)
            served.setdefault(name, []).append((p, local))
        return served

    def sq_grad_sums(self) -> dict[str, torch.Tensor]:
        """``sum_n (grad of sample n's loss)^2`` for every parameter in ``params``."""
        out: dict[str, torch.Tensor] = {}
        for name, pairs in self._by_module().items():
            module = self.ctx.modules[name]
            res = sq_grad_sums(module, self._calls(name), self.scale, only={loc for _, loc in pairs})
            for p, local in pairs:
                out[p] = res[local] if local in res else torch.zeros_like(self.ctx.params[p])
        return out

    def grads(self, sl: slice | None = None) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``(n, *shape)`` of the sample losses for every parameter in ``params``."""
        out: dict[str, torch.Tensor] = {}
        for name, pairs in self._by_module().items():
            module = self.ctx.modules[name]
            only = {loc for _, loc in pairs}
            acc: dict[str, torch.Tensor] = {}
            for rec, g in self._calls(name):
                for k, v in per_sample_grads(module, rec, g, self.scale, sl, only=only).items():
                    acc[k] = acc[k] + v if k in acc else v
            for p, local in pairs:
                out[p] = acc[local]
        return out

    def member_rows(self) -> torch.Tensor:
        """``(N, members)`` rows: per sample, ``<grad of the sample's loss, member's channel weights>``.

        Conv/linear/norm members come from activations (no per-sample gradient is formed); other members
        (attention, bare parameters...) from per-sample gradients of their parameters.
        """
        ctx, layout = self.ctx, self.ctx.layout
        n = self.batch.size
        rows = torch.zeros(n, layout.num_members, device=ctx.device, dtype=torch.float64
                           if any(p.dtype == torch.float64 for p in ctx.params.values()) else torch.float32)
        covered = set()
        for gi, mi, m, module in self._row_members:
            covered.add((gi, mi))
            total = None
            for k, rec in enumerate(self.capture.records[m.module]):
                g = self.grad_out.get((m.module, k))
                if g is None:
                    continue
                r = activation_rows(m.kind, module, rec, g,
                                    input_grad=lambda rec=rec, g=g: torch.autograd.grad(
                                        rec.y, rec.x, g, retain_graph=True)[0])
                total = r if total is None else total + r
            if total is None:
                continue
            off = layout.member_offsets[gi][mi]
            rows.index_add_(1, (off + m.root).to(ctx.device), total.index_select(1, m.index.to(ctx.device)).to(rows.dtype))
        rest = [(gi, mi, m) for gi, g in enumerate(ctx.groups) for mi, m in enumerate(g.members)
                if (gi, mi) not in covered]
        if rest:
            needed = sorted({s.param for _, _, m in rest for s in m.slices})
            sub = PerSampleView(self, needed)
            theta = ctx.theta
            for gi, mi, m in rest:
                off = layout.member_offsets[gi][mi]
                for s in m.slices:
                    sums = sub.axis_rows(s.param, s.axis, s.groups, theta[s.param])
                    rows.index_add_(1, (off + s.root).to(ctx.device),
                                    sums.index_select(1, s.index.to(ctx.device)).to(rows.dtype))
        return rows * self.scale


class PerSampleView:
    """Per-sample gradients of a few parameters, reduced to per-sample axis sums with the weights."""

    def __init__(self, sp: PerSamplePass, params: list[str]):
        saved = sp.params, sp._owner
        sp.params = params
        sp._owner = {p: sp._candidates(p) for p in params}
        try:
            # unscaled: PerSamplePass.member_rows applies the per-sample scale once at the end
            scale, sp.scale = sp.scale, 1.0
            self.grads = sp.grads()
        finally:
            sp.scale = scale
            sp.params, sp._owner = saved

    def axis_rows(self, param: str, axis: int, groups: int, theta: torch.Tensor) -> torch.Tensor:
        g = self.grads[param]  # (N, *shape)
        prod = g * theta.unsqueeze(0)
        n = prod.shape[0]
        if theta.dim() <= 1:
            return prod.reshape(n, -1)
        if axis == IN_AXIS or axis == 1:
            o, i = theta.shape[0], theta.shape[1]
            return prod.reshape(n, groups, o // groups, i, -1).sum((2, 4)).reshape(n, groups * i)
        axis = axis % theta.dim()
        dims = [d for d in range(1, prod.dim()) if d != axis + 1]
        return prod.sum(dims)


def tensors_requiring_grad(obj: Any) -> list[torch.Tensor]:
    """Every tensor that requires grad in a model's (nested list/tuple/dict) output, in order: the
    outputs a second-order pass differentiates through."""
    found: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            if o.requires_grad:
                found.append(o)
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x)
        elif isinstance(o, dict):
            for x in o.values():
                walk(x)

    walk(obj)
    return found
