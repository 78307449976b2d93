"""SOSP (Nonnenmacher et al., ICLR 2022): second-order structured pruning with global correlations.

Both criteria score a structure ``s`` (one channel of a group: every member's parameters removed with
that channel; ``theta_s`` is the sum of the members' parameter vectors) by a second-order Taylor
expansion of the loss in which the Hessian is replaced by the generalised Gauss-Newton matrix

    GGN = J^T Lambda J,    J = d(model outputs)/d(theta),    Lambda = d^2 L / d(outputs)^2,

so the curvature couples structures across *all* layers. Removing ``s`` is ``delta theta = -theta_s``.

**sosp-h** [reconstructed: the paper's full text could not be checked; this is a principled version]::

    u        = GGN theta_M,      theta_M = sum_s theta_s
    lambda_s = |theta_s^T g| + 1/2 |theta_s^T u|

``theta_M`` sums every prunable structure's parameters; a weight that belongs to two structures
(``W[o, i]`` of a conv is in out-channel ``o``'s group and in in-channel ``i``'s group) counts twice,
so ``theta_s^T u = sum_s' theta_s^T GGN theta_s'`` is exactly the row sum of SOSP-I's matrix ``Q``.
With channel gates (:mod:`pyobc.scoring.gates`) ``theta_M`` is the direction of a common shift of all
gates, ``J theta_M`` is one forward-mode derivative of the outputs along it, ``Lambda (J theta_M)`` one
Hessian-vector product in output space (exact for any loss), and ``theta_s^T J^T (Lambda J theta_M)``
for every structure at once is one reverse pass of ``<stopgrad(Lambda J theta_M), z>`` to the gates.
No weight gradient is formed and there is no loop over structures: per batch one forward pass that
also carries the tangent, and two backward passes to the gates (about OBA's cost).

**sosp-i** [reconstructed]::

    U_n       = d z(x_n) / d c                     (K outputs x S structures, per sample n)
    Q         = sum_n U_n^T Lambda_n U_n           (= theta_s^T GGN theta_s' for the batch loss)
    lambda_s  = |theta_s^T g| + 1/2 sum_s' |Q_ss'|

``c`` are per-sample channel gates, ``Lambda_n`` the output-space Hessian of sample ``n``'s contribution
to the batch loss (for mean cross-entropy ``(diag p_n - p_n p_n^T) / N``; pyobc computes it by
Hessian-vector products of the actual loss, which must be a sum or mean of per-sample terms). ``U``
takes one backward pass per output dimension (``K`` of them, e.g. the number of classes); ``Q`` is
``S x S`` over all group channels, so memory is quadratic in the number of structures: an estimate is
checked against the option ``max_memory`` before anything large is allocated.

Both: per batch the signed ``theta_s^T g``, ``theta_s^T u`` (and ``Q``) are summed; the scores use their
means over batches, then the absolute values. ``Scores.extras`` holds, per group root (the keys of
:meth:`~pyobc.scoring.scores.Scores.by_module`), the signed means ``"theta_g"`` (``theta_s^T g``) and
``"theta_u"`` (``theta_s^T u``; for SOSP-I the row sums of ``Q``), float64 on the CPU: the raw material
of SOSP's architecture-bottleneck view (the layers it prunes least are the ones to widen). SOSP-I adds
``"Q"`` (float64, CPU): rows and columns are the group channels in the order of ``Scores.groups``,
each group's channels contiguous.

Example:
    >>> import pyobc
    >>> model = pyobc.models.resnet20(num_classes=10, in_channels=1, input_size=16)
    >>> loader = pyobc.datasets.digits("train", batch_size=64, image_size=16, channels=1)
    >>> s = pyobc.score(model, loader, "sosp-h", max_batches=2)                  # doctest: +SKIP
    >>> s.by_module()["conv1"].shape, s.extras["theta_u"]["conv1"].shape       # doctest: +SKIP
    (torch.Size([16]), torch.Size([16]))
    >>> q = pyobc.score(model, loader, "sosp-i", max_batches=2).extras["Q"]     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd import forward_ad

from . import register
from .base import Criterion, Result, model_outputs, validate_micro_batch
from ..scoring.gates import GatedModel, gate_layout, second_order_mode
from ..scoring.layout import Layout

__all__ = ["SOSPH", "SOSPI", "SOSPMemoryError"]


class SOSPMemoryError(MemoryError, ValueError):
    """SOSP-I's estimated memory exceeds the option ``max_memory``."""


def _grad(outputs, inputs, grad_outputs=None, **kw) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` that tolerates outputs which do not require grad (they contribute 0)."""
    outputs = list(outputs)
    grad_outputs = [None] * len(outputs) if grad_outputs is None else list(grad_outputs)
    keep = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not keep:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in keep], inputs, [g for _, g in keep], allow_unused=True, **kw))


def _model_outputs(outputs: list) -> list[torch.Tensor]:
    zs = model_outputs(outputs)
    if not zs:
        raise RuntimeError("SOSP's Gauss-Newton curvature needs the model's outputs, but loss_fn did not call "
                           "the model (or its outputs do not depend on the parameters)")
    return zs


def _output_hvp(loss: torch.Tensor, zs: Sequence[torch.Tensor], dzs: Sequence[torch.Tensor | None]
                ) -> list[torch.Tensor | None]:
    """``Lambda dz`` with ``Lambda`` the Hessian of ``loss`` w.r.t. the outputs ``zs`` (exact, any loss)."""
    c = _grad([loss], zs, create_graph=True, retain_graph=True)
    terms = [(ci * dz).sum() for ci, dz in zip(c, dzs) if ci is not None and dz is not None and ci.requires_grad]
    if not terms:  # loss linear in the outputs
        return [None] * len(zs)
    return _grad([torch.stack(terms).sum()], zs, retain_graph=True)


def _group_values(layout: Layout, gm: GatedModel, gate_grads: list[torch.Tensor | None]) -> torch.Tensor:
    """Gate gradients -> group channels (sum over each channel's members)."""
    return layout.group_sum(gm.members([None if g is None else g.detach() for g in gate_grads]))


class _SOSP(Criterion):
    """What SOSP-H and SOSP-I share: the gate layout, theta_M's direction, the score formula, extras."""

    def _layout(self) -> Layout:
        return gate_layout(self.ctx)

    def _per_group(self, channels: torch.Tensor) -> dict[str, torch.Tensor]:
        layout = self._layout()
        return {g.root: v.detach().to("cpu", torch.float64).clone()
                for g, v in zip(layout.groups, layout.split(channels))}

    def _result(self, theta_g: torch.Tensor, theta_u: torch.Tensor, curvature: torch.Tensor,
                extras: dict | None = None) -> Result:
        layout = self._layout()
        scores = theta_g.abs() + 0.5 * curvature
        dtype = next(iter(self.ctx.params.values())).dtype
        scores = scores.to(dtype if dtype.is_floating_point else torch.float32)
        out = {"theta_g": self._per_group(theta_g), "theta_u": self._per_group(theta_u)}
        out.update(extras or {})
        return Result(layout.split(scores), extras=out)


@register
class SOSPH(_SOSP):
    """SOSP-H [reconstructed]: ``lambda_s = |theta_s^T g| + 1/2 |theta_s^T GGN theta_M|``.

    ``theta_M = sum_s theta_s`` over every prunable structure (weights in two structures count twice,
    so ``theta_s^T GGN theta_M`` equals the row sum of SOSP-I's ``Q``). Per batch: ``J theta_M`` by
    forward-mode differentiation of the gated pass along a common shift of all gates, ``Lambda J theta_M``
    by a Hessian-vector product in output space, ``theta_s^T J^T Lambda J theta_M`` for all ``s`` by one
    reverse pass to the gates, ``theta_s^T g`` by another. Signed values are averaged over batches, then
    the absolute values enter the score. ``extras["theta_g"]`` / ``extras["theta_u"]``: the signed means
    per group root.

    Options: ``micro_batch`` (16): run over micro-batches of this many samples, weighted ``n_i / N``
    (exact for per-sample mean losses, checked once; bounds memory); ``jvp`` — how ``J theta_M`` is computed: ``"forward"`` (forward-mode AD, one pass carrying the
    tangent; the cheapest), ``"double-vjp"`` (reverse-over-reverse: for models with operations that have
    no forward-mode derivative), ``"auto"`` (forward, falling back to double-vjp if the model needs it).
    """

    name = "sosp-h"
    description = ("SOSP-H [reconstructed]: |theta_s.g| + 1/2 |theta_s.GGN theta_M|, one JVP and two VJPs "
                   "per batch, global curvature across all layers")
    defaults = {"jvp": "auto", "micro_batch": 16}

    def validate(self) -> None:
        self._choice("jvp", ("auto", "forward", "double-vjp"))
        validate_micro_batch(self.name, self.opts["micro_batch"])
        self._mode = "double-vjp" if self.opts["jvp"] == "double-vjp" else "forward"

    def _tangents(self, gm: GatedModel) -> list[torch.Tensor]:
        """The gate-space direction of theta_M: how many member channels use each gate entry (a gate
        entry no structure uses gets 0, one shared by two members 2)."""
        layout = gm.layout
        counts = torch.zeros(layout.num_sources, dtype=gm.dtype)
        counts.index_add_(0, layout.src, torch.ones(layout.src.numel(), dtype=gm.dtype))
        counts = counts.to(self.ctx.device)
        return [counts[layout.source_offsets[k]:layout.source_offsets[k] + layout.source_lengths[k]]
                for k in layout.source_keys]

    def update(self, batch) -> None:
        # GGN products are sums over samples: micro-batches (weights n_i / N) bound the memory
        layout = self._layout()
        for part, weight in self.ctx.micro_batches(batch, self.opts["micro_batch"]):
            first, u, gm = self._gate_products(part)
            self.add("theta_g", _group_values(layout, gm, first).double() * weight)
            self.add("theta_ggn_theta", _group_values(layout, gm, u).double() * weight)
        self.add("batches", 1)

    def _gate_products(self, batch):
        """(theta_s^T g, theta_s^T GGN theta_M) per gate for one micro-batch, and its gated model."""
        gm = GatedModel(self.ctx, unit_gates=self._mode == "forward")  # forward mode differentiates once
        tangents = self._tangents(gm)
        if self._mode == "forward":
            try:
                first, u = self._forward_mode(gm, batch, tangents)
            except (RuntimeError, NotImplementedError) as e:
                if self.opts["jvp"] != "auto" or not _forward_ad_unsupported(e):
                    raise
                self._mode = "double-vjp"  # a run-time choice, not scoring state
                gm = GatedModel(self.ctx)
        if self._mode == "double-vjp":
            first, u = self._double_vjp(gm, batch, tangents)
        return first, u, gm

    def _forward_mode(self, gm: GatedModel, batch, tangents):
        with forward_ad.dual_level():
            loss, outputs = gm.run(batch, tangents=tangents)
            zs = _model_outputs(outputs)
            dzs = [forward_ad.unpack_dual(z).tangent for z in zs]
            dzs = [None if t is None else t.detach() for t in dzs]
        with second_order_mode():
            first = _grad([loss], gm.gates, retain_graph=True)
            hv = _output_hvp(loss, zs, dzs)
            u = _grad(zs, gm.gates, [torch.zeros_like(z) if h is None else h for z, h in zip(zs, hv)])
        return first, u

    def _double_vjp(self, gm: GatedModel, batch, tangents):
        loss, outputs = gm.run(batch)
        zs = _model_outputs(outputs)
        with second_order_mode():
            # w(v) = dL/dgates + J^T v at v = 0: the first-order term; d<w, t>/dv = J t
            vs = [torch.zeros_like(z, requires_grad=True) for z in zs]
            w = _grad([loss] + zs, gm.gates, [None] + vs, create_graph=True)
            terms = [(wi * t).sum() for wi, t in zip(w, tangents) if wi is not None and wi.requires_grad]
            dzs = _grad([torch.stack(terms).sum()], vs, retain_graph=True) if terms else [None] * len(zs)
            dzs = [None if d is None else d.detach() for d in dzs]
            first = [None if wi is None else wi.detach() for wi in w]
            hv = _output_hvp(loss, zs, dzs)
            u = _grad(zs, gm.gates, [torch.zeros_like(z) if h is None else h for z, h in zip(zs, hv)])
        return first, u

    def finalize(self) -> Result:
        nb = self.count("batches")
        g = self.acc["theta_g"] / nb
        u = self.acc["theta_ggn_theta"] / nb
        return self._result(g, u, u.abs())


def _forward_ad_unsupported(e: Exception) -> bool:
    msg = str(e).lower()
    return any(k in msg for k in ("forward ad", "forward-mode", "forward mode", "jvp", "fw_grad", "forward grad"))


@register
class SOSPI(_SOSP):
    """SOSP-I [reconstructed]: ``lambda_s = |theta_s^T g| + 1/2 sum_s' |Q_ss'|``,
    ``Q = sum_n U_n^T Lambda_n U_n = theta_s^T GGN theta_s'``.

    ``U_n = d z(x_n) / d c`` are the output-space effects of per-sample channel gates (one backward
    pass per output dimension), ``Lambda_n`` the output-space Hessian of sample ``n``'s term of the
    batch loss (computed by Hessian-vector products, so any loss that is a sum or mean of per-sample
    terms works). ``Q`` is averaged over batches (``extras["Q"]``, float64, CPU, group channels in the
    order of ``Scores.groups``), as are ``theta_s^T g`` and the signed row sums of ``Q``
    (``extras["theta_g"]``, ``extras["theta_u"]`` per group root; the latter equals SOSP-H's
    ``theta_s^T u``).

    Per-sample gates exist for conv/linear/norm members only; models whose groups hold other members
    (attention projections, embeddings, bare parameters) get a clear error naming them.

    Options: ``max_memory`` (bytes, default 2 GiB): the estimated memory of the ``S x S`` matrices and of
    one batch's ``N x K x S`` output effects must stay below it (``S`` structures, ``N`` batch size,
    ``K`` outputs per sample), else :class:`SOSPMemoryError` says how to reduce it.
    """

    name = "sosp-i"
    description = ("SOSP-I [reconstructed]: |theta_s.g| + 1/2 sum_s' |theta_s.GGN theta_s'| from per-sample "
                   "output effects of channel gates; memory quadratic in the number of structures")
    defaults = {"max_memory": 2 * 2**30}

    def validate(self) -> None:
        mm = self.opts["max_memory"]
        if not isinstance(mm, (int, float)) or isinstance(mm, bool) or not mm > 0:
            raise TypeError(f"method 'sosp-i': option max_memory must be a positive number of bytes, got {mm!r}")
        self._check_members()
        self._check_memory(0, 0)

    def _check_members(self) -> None:
        layout = self._layout()
        params = {k[1] for k in layout.source_keys if k[0] == "param"}
        if not params:
            return
        bad = []
        for g in self.ctx.groups:
            for m in g.members:
                if any(s.param in params for s in m.slices):
                    bad.append(f"{m.module or '<model>'} ({m.module_type}, {m.kind} member of group {g.root!r})")
        roots = sorted({g.root for g in self.ctx.groups for m in g.members if any(s.param in params for s in m.slices)})
        raise NotImplementedError(
            "sosp-i needs per-sample channel gates, which pyobc supports on conv/linear/norm layers only; "
            f"these members are not: {', '.join(dict.fromkeys(bad))}. Pass ignored_layers={roots} to leave "
            "their groups unscored, or use sosp-h (which handles every member)")

    def _estimate(self, n: int, k: int) -> int:
        layout = self._layout()
        s = layout.num_channels
        item = torch.finfo(next(iter(self.ctx.params.values())).dtype).bits // 8
        fixed = 3 * 8 * s * s  # accumulator, the batch's Q, the float64 copy at the end
        per_batch = item * (2 * n * k * s + n * k * k + n * (layout.num_sources + layout.num_members + s))
        return fixed + per_batch

    def _check_memory(self, n: int, k: int) -> None:
        need = self._estimate(n, k)
        limit = self.opts["max_memory"]
        if need > limit:
            s = self._layout().num_channels
            what = (f"{s} structures (S x S matrices)" if n == 0 else
                    f"{s} structures, batch {n} x {k} outputs (N x K x S output effects)")
            raise SOSPMemoryError(
                f"sosp-i needs about {need / 2**20:.1f} MiB ({need} bytes) for {what}, over "
                f"max_memory={limit} bytes. Reduce it: fewer structures (pass ignored_layers to leave groups "
                "unscored), a smaller batch, or raise max_memory; sosp-h scores all structures in "
                "memory linear in their number")

    def update(self, batch) -> None:
        ctx = self.ctx
        layout = self._layout()
        n = batch.size
        gm = GatedModel(ctx, per_sample=n)
        loss, outputs = gm.run(batch)
        zs = _model_outputs(outputs)
        for z in zs:
            if z.dim() == 0 or z.shape[0] != n:
                raise ValueError(f"sosp-i needs model outputs with the batch on dim 0 (batch {n}), got an output "
                                 f"of shape {tuple(z.shape)}")
        widths = [z[0].numel() for z in zs]
        k_total = sum(widths)
        self._check_memory(n, k_total)
        s = layout.num_channels
        with second_order_mode():
            first = _grad([loss], gm.gates, retain_graph=True)
            c = _grad([loss], zs, create_graph=True, retain_graph=True)
            U = torch.zeros(n, k_total, s, dtype=gm.dtype, device=ctx.device)
            lam = torch.zeros(n, k_total, k_total, dtype=gm.dtype, device=ctx.device)
            k = 0
            for i, (z, w) in enumerate(zip(zs, widths)):
                for j in range(w):
                    e = [torch.zeros(zz.shape, dtype=zz.dtype, device=zz.device) for zz in zs]
                    e[i].view(n, -1)[:, j] = 1
                    rows = _grad(zs, gm.gates, e, retain_graph=True)  # per-sample d z_n[k] / d c_n
                    U[:, k] = _group_values(layout, gm, rows)
                    terms = [(ci * ei).sum() for ci, ei in zip(c, e) if ci is not None and ci.requires_grad]
                    if terms:  # column k of every sample's output Hessian (samples are separable)
                        hv = _grad([torch.stack(terms).sum()], zs, retain_graph=True)
                        lam[:, :, k] = torch.cat([torch.zeros(n, ww, dtype=gm.dtype, device=ctx.device)
                                                  if h is None else h.detach().reshape(n, -1)
                                                  for h, ww in zip(hv, widths)], dim=1)
                    k += 1
        lam = 0.5 * (lam + lam.transpose(1, 2))
        lu = torch.bmm(lam, U)
        q = U.reshape(-1, s).transpose(0, 1) @ lu.reshape(-1, s)
        del U, lu
        self.add("Q", q.double())
        self.add("theta_g", _group_values(layout, gm, first).sum(0).double())
        self.add("batches", 1)

    def finalize(self) -> Result:
        nb = self.count("batches")
        q = self.acc["Q"] / nb
        g = self.acc["theta_g"] / nb
        return self._result(g, q.sum(1), q.abs().sum(1), extras={"Q": q.detach().to("cpu", torch.float64).clone()})
