"""One recorded forward pass per batch and the per-sample quantities that follow from it.

:class:`PerSamplePass` runs the loss once while recording the layers it needs, then serves squared
per-sample gradient sums (OBD's diagonal Fisher), per-sample gradients, and per-sample Jacobian rows of
every group member (Optimal Brain Connection's ``rows="sample"``, SOSP) through the closed forms of
:mod:`pyobc.scoring.per_sample`, without a Python loop over samples.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..grouping import IN_AXIS
from ..nested import map_tensors
from .capture import Record
from .context import Batch, Context
from .per_sample import activation_rows, per_sample_grads, sq_grad_sums, supports_activation_rows

__all__ = ["PerSamplePass", "axis_rows"]


def _owner_candidates(param: str) -> list[str]:
    """Owner module of ``param`` and its ancestors, nearest first (the root model is '')."""
    parts = param.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


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

    def __init__(self, ctx: Context, batch: Batch, params: list[str], rows: bool = False,
                 sq_sums: bool = False):
        self.ctx = ctx
        self.batch = batch
        self.params = list(params)
        self._sq: dict[str, torch.Tensor] | None = None
        self._row_members = []
        fallback: list[str] = []  # parameters of members whose rows need per-sample gradients
        watch: dict[str, nn.Module] = {}
        if rows:
            for gi, g in enumerate(ctx.groups):
                for mi, m in enumerate(g.members):
                    module = ctx.modules.get(m.module)
                    if (module is not None and m.module in ctx.called
                            and supports_activation_rows(m.kind, module, ctx.channel_axes)):
                        watch[m.module] = module
                        self._row_members.append((gi, mi, m, module))
                    else:
                        fallback.extend(s.param for s in m.slices)
        # watch only the module that will serve each parameter (the nearest one that runs)
        for p in dict.fromkeys(self.params + fallback):
            cands = _owner_candidates(p)
            name = next((c for c in cands if c in ctx.called), cands[-1])
            watch[name] = ctx.modules[name]
        self.scale = float(batch.size)  # mean-loss gradient -> per-sample-loss gradient
        self.grad_out: dict[tuple[str, int], torch.Tensor | None] = {}
        if sq_sums and not rows:
            self._sq = self._streamed_sq_grad_sums(watch)
            return
        self.loss, self.capture = ctx.capture_forward(batch, watch)
        outs = self.capture.outputs()
        # rows need the graph again (input gradients through single layers, per-sample fallbacks)
        grads = torch.autograd.grad(self.loss, [y for _, _, y in outs], allow_unused=True, retain_graph=rows)
        self.grad_out = {(name, k): g for (name, k, _), g in zip(outs, grads)}

    def _streamed_sq_grad_sums(self, watch: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """:meth:`sq_grad_sums` computed during the backward pass, each module's as soon as the gradients
        of all its calls have arrived, so that no more than a few output gradients are alive at once (a
        gradient of every recorded output held together made OBD's peak memory 2.3x a forward+backward on
        ResNet-56). The backward pass runs to a scalar leaf added to the batch's floating-point tensors,
        which every activation computed from them lies on the way to; outputs it does not reach (models
        fed token ids; layers fed only by buffers) get theirs from :meth:`_missed_gradients`."""
        ctx = self.ctx
        probe = torch.zeros((), device=ctx.device, requires_grad=True)
        floats = [False]

        def feed(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return t
            floats[0] = True
            return t + probe.to(t.dtype)  # a non-leaf: in-place ops of the model on its inputs still work

        batch = Batch(map_tensors(feed, self.batch.data), self.batch.size, self.batch.index)
        sums: dict[str, torch.Tensor] = {}
        done: set[str] = set()  # modules served
        hooked: dict[tuple[str, int], torch.utils.hooks.RemovableHandle] = {}  # calls whose gradient will come

        def finish(name: str) -> None:
            done.add(name)
            sums.update(self._module_sq_sums(name, served[name]))
            for k in range(len(self.capture.records[name])):
                self.grad_out.pop((name, k), None)
            # drop the module's records as the backward drops its saved tensors: activations held to the
            # end of the batch kept the backward from reusing their memory, and under glibc's heap trimming
            # that made the backward 1.6x slower (bench/RESULTS.md, issue #15)
            self.capture.records[name] = []

        def arrived(name: str, k: int, g: torch.Tensor) -> None:
            if name not in waiting or name in done or (name, k) in self.grad_out:  # not served, or already
                return
            self.grad_out[(name, k)] = g
            waiting[name] -= 1
            if waiting[name] == 0:
                finish(name)

        def hook(name: str, k: int, y: torch.Tensor) -> None:
            # hooked while recorded, so that the record need not hold the output (see Capture's on_output)
            hooked[(name, k)] = y.register_hook(lambda g: arrived(name, k, g))

        self.loss, self.capture = ctx.capture_forward(batch, watch, on_output=hook if floats[0] else None)
        served = self._by_module(self.params)
        if floats[0]:
            keys = [key for key in hooked if key[0] in served]
        else:  # no backward to hook: every gradient comes from _missed_gradients
            keys = [(n, k) for n, k, _ in self.capture.outputs() if n in served]
        waiting = {name: sum(1 for n, _ in keys if n == name) for name in served}  # calls still to come
        try:
            if floats[0]:  # the graph is freed as the backward goes, like a plain backward's
                torch.autograd.grad(self.loss, probe, allow_unused=True)
        finally:
            for h in hooked.values():
                h.remove()
        missing = {name for name, _ in keys if name in served and name not in done}
        if missing:
            self._missed_gradients(missing, watch, rerun=floats[0])
        for name in served:
            if name not in done:
                finish(name)  # outputs the loss does not depend on: their calls' gradients are None
        return sums

    def _missed_gradients(self, names: set[str], watch: dict[str, nn.Module], rerun: bool) -> None:
        """Output gradients of the modules ``names`` that the streamed backward did not reach, from one
        ``autograd.grad`` call; after a backward that freed the graph, on a second forward pass that records
        only these modules (their records are replaced by that pass's)."""
        loss, capture = self.loss, self.capture
        if rerun:
            loss, capture = self.ctx.capture_forward(self.batch, {n: watch[n] for n in names})
            for n in names:
                self.capture.records[n] = capture.records[n]
        outs = [(n, k, y) for n, k, y in capture.outputs() if n in names and (n, k) not in self.grad_out]
        if outs:
            grads = torch.autograd.grad(loss, [y for _, _, y in outs], allow_unused=True)
            for (n, k, _), g in zip(outs, grads):
                self.grad_out[(n, k)] = g

    def _serving_module(self, param: str) -> tuple[str, str]:
        """(module name, parameter name local to it) of the nearest called module owning ``param``."""
        if self._sq is not None:
            raise RuntimeError("PerSamplePass(sq_sums=True) serves sq_grad_sums() only: its records were "
                               "released during the backward pass (construct it without sq_sums for "
                               "per-sample gradients or rows)")
        for name in _owner_candidates(param):
            if self.capture.records.get(name):
                local = param[len(name) + 1:] if name else param
                return name, local
        raise RuntimeError(f"no module owning parameter {param!r} was called in the forward pass")

    def _calls(self, name: str) -> list[tuple[Record, list]]:
        return [(r, [self.grad_out.get((name, k))]) for k, r in enumerate(self.capture.records[name])]

    def _by_module(self, params: list[str]) -> dict[str, list[tuple[str, str]]]:
        served: dict[str, list[tuple[str, str]]] = {}
        for p in params:
            name, local = self._serving_module(p)
            served.setdefault(name, []).append((p, local))
        return served

    def sq_grad_sums(self) -> dict[str, torch.Tensor]:
        """``sum_n (grad of sample n's loss)^2`` for every parameter in ``params``."""
        if self._sq is not None:
            return dict(self._sq)
        out: dict[str, torch.Tensor] = {}
        for name, pairs in self._by_module(self.params).items():
            out.update(self._module_sq_sums(name, pairs))
        return out

    def _module_sq_sums(self, name: str, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """:func:`~pyobc.scoring.per_sample.sq_grad_sums` of module ``name`` for its ``(param, local)``
        pairs, from the gradients of its calls in :attr:`grad_out` (zeros for parameters it has none of)."""
        res = sq_grad_sums(self.ctx.modules[name], self._calls(name), self.scale, only={loc for _, loc in pairs})
        return {p: res[local] if local in res else torch.zeros_like(self.ctx.params[p]) for p, local in pairs}

    def grads(self, sl: slice | None = None, params: list[str] | None = None,
              scale: float | None = None) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``(n, *shape)`` of the sample losses for ``params`` (default: those given
        at construction), multiplied by ``scale`` (default: the batch size, turning gradients of the mean
        loss into gradients of each sample's loss)."""
        params = self.params if params is None else params
        scale = self.scale if scale is None else scale
        out: dict[str, torch.Tensor] = {}
        for name, pairs in self._by_module(params).items():
            module = self.ctx.modules[name]
            only = {loc for _, loc in pairs}
            acc: dict[str, torch.Tensor] = {}
            for rec, g in self._calls(name):
                for k, v in per_sample_grads(module, rec, g, scale, sl, only=only).items():
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
                r = activation_rows(m.kind, module, rec, g, ctx.channel_axes,
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
            # unscaled: the per-sample scale is applied once, at the end
            grads = self.grads(params=needed, scale=1.0)
            theta = ctx.theta
            for gi, mi, m in rest:
                off = layout.member_offsets[gi][mi]
                for s in m.slices:
                    sums = axis_rows(grads[s.param], s.axis, s.groups, theta[s.param])
                    rows.index_add_(1, (off + s.root).to(ctx.device),
                                    sums.index_select(1, s.index.to(ctx.device)).to(rows.dtype))
        return rows * self.scale


def axis_rows(grads: torch.Tensor, axis: int, groups: int, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample sums of ``grads * theta`` (``grads``: ``(N, *theta.shape)``) for each index of ``axis``
    (:data:`~pyobc.grouping.IN_AXIS`: the group-expanded input channels of a conv/linear weight)."""
    prod = grads * theta.unsqueeze(0)
    n = prod.shape[0]
    if theta.dim() <= 1:
        return prod.reshape(n, -1)
    if axis == IN_AXIS or axis == 1:
        o, i = theta.shape[0], theta.shape[1]
        return prod.reshape(n, groups, o // groups, i, -1).sum((2, 4)).reshape(n, groups * i)
    axis = axis % theta.dim()
    dims = [d for d in range(1, prod.dim()) if d != axis + 1]
    return prod.sum(dims)
