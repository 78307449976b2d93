"""Optimal Brain Apoptosis (Sun et al., ICLR 2025): second-order Taylor with exact Hessian blocks."""
from __future__ import annotations

import torch
from ..layers import is_norm_layer
from ..scoring.gates import GatedModel, gate_layout, second_order_mode
from . import register
from .base import Criterion, Result, model_outputs, validate_micro_batch


def linearised(loss: torch.Tensor, outputs: list) -> torch.Tensor:
    """``<stopgrad(dL/dz), z>`` over the model's outputs ``z``: its Hessian in theta is ``H - GGN``."""
    zs = model_outputs(outputs)
    if not zs:
        raise RuntimeError("OBA's inter-layer Hessian needs the model's outputs, but loss_fn did not call the "
                           "model (or its outputs do not depend on the parameters)")
    cs = torch.autograd.grad(loss, zs, retain_graph=True, allow_unused=True)
    terms = [(c.detach() * z).sum() for c, z in zip(cs, zs) if c is not None]
    return torch.stack(terms).sum()


@register
class OBA(Criterion):
    """Per weight, per batch: ``S = theta * (H - GGN) v`` with ``v = theta`` on conv/linear weights and
    biases (and on attention projections, embeddings and bare parameters) and ``v = 0`` on norm
    parameters. ``H - GGN = sum_k (dL/dz_k) d^2 z_k`` keeps exactly the Hessian blocks *between* layers
    that feed one another or whose outputs are multiplied (attention's q k^T and A v); the blocks within
    a conv/linear layer are zero. Second derivatives of nonlinearities (GELU, softmax, LayerNorm) are
    kept exactly — pyobc differentiates the real network, in eval mode (BatchNorm is affine there).

    Channel scores come from one second-order pass of per-channel gates (see
    :mod:`pyobc.scoring.gates`): no weight gradients, cost flat in depth. Aggregation (reference
    defaults): per batch, signed sum of S over each member's parameters; per member ``|mean over
    batches|``; per group ``group_reduction`` over members (``"mean"`` of the non-zero members,
    ``"sum"`` or ``"max"``); then ``normalize="max"`` divides by the group maximum (``"none"`` keeps
    raw values).

    Options: ``hessian="inter-layer"`` (default) or ``"full"`` (``theta * H theta`` over all
    parameters, the authors' "FastOBA"); ``delta`` adds ``delta * theta * g`` (first-order term, 0);
    ``micro_batch`` (16): the second-order pass runs over micro-batches of this many samples and adds
    them with weights ``n_i / N`` — exact for losses that are means of per-sample terms (checked once),
    and it keeps peak memory near that of a plain forward+backward; ``None`` processes whole batches.
    Per-weight scores (``granularity="weight"``): the raw S averaged over batches (no abs).
    """

    name = "oba"
    description = "Optimal Brain Apoptosis: theta*(H-GGN)theta from one exact Hessian-vector product per batch"
    granularities = ("channel", "weight")
    defaults = {"hessian": "inter-layer", "delta": 0.0, "group_reduction": "mean", "normalize": "max",
                "micro_batch": 16}

    def validate(self) -> None:
        self._choice("hessian", ("inter-layer", "full"))
        self._choice("group_reduction", ("mean", "sum", "max"))
        self._choice("normalize", ("max", "none"))
        if not isinstance(self.opts["delta"], (int, float)) or isinstance(self.opts["delta"], bool):
            raise TypeError(f"method 'oba': option delta must be a number, got {self.opts['delta']!r}")
        validate_micro_batch(self.name, self.opts["micro_batch"])

    def _objective(self, loss: torch.Tensor, outputs: list) -> torch.Tensor:
        return linearised(loss, outputs) if self.opts["hessian"] == "inter-layer" else loss

    def update(self, batch) -> None:
        # second-order passes hold the first backward's graph: bound memory with micro-batches
        for part, weight in self.ctx.micro_batches(batch, self.opts["micro_batch"]):
            if self.per_weight:
                self._update_weights(part, weight)
            else:
                self._update_channels(part, weight)
        self.add("batches", 1)

    def _update_channels(self, batch, weight: float = 1.0) -> None:
        gm = GatedModel(self.ctx, eps_scope="linear" if self.opts["hessian"] == "inter-layer" else "all")
        loss, outputs = gm.run(batch)
        with second_order_mode():
            objective = self._objective(loss, outputs) * weight
            first = torch.autograd.grad(objective, [gm.eps] + gm.gates, create_graph=True, allow_unused=True)
            s, a1 = first[0], first[1:]
            if s is not None and s.requires_grad:
                a2 = torch.autograd.grad(s, gm.gates, allow_unused=True)
            else:
                a2 = [None] * len(gm.gates)
        g_members = gm.members(a1).detach()
        h_members = gm.members(a2)
        # d2/d(alpha)d(eps) = theta_s^T H v + theta_s^T g where alpha and eps scale the same weights
        s_members = h_members - gm.shared * g_members + self.opts["delta"] * g_members
        self.add("member_scores", s_members)

    def _direction(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Hessian-vector product's ``v``: theta, with zeros on norm parameters for the inter-layer Hessian."""
        if self.opts["hessian"] == "full":
            return theta
        norm = {f"{n}.{k}" if n else k for n, m in self.ctx.modules.items() if is_norm_layer(m)
                for k, _ in m.named_parameters(recurse=False)}
        return {n: (torch.zeros_like(t) if n in norm else t) for n, t in theta.items()}

    def _update_weights(self, batch, weight: float = 1.0) -> None:
        ctx = self.ctx
        names = list(ctx.params)
        leaves = [ctx.params[n] for n in names]
        outputs: list = []
        with second_order_mode():
            loss = ctx.loss(batch, outputs=outputs)
            objective = self._objective(loss, outputs) * weight
            grads = torch.autograd.grad(objective, leaves, create_graph=True, allow_unused=True)
            theta, v = ctx.theta, self._direction(ctx.theta)
            dot = sum((g * v[n]).sum() for n, g in zip(names, grads) if g is not None and g.requires_grad)
            if isinstance(dot, torch.Tensor):
                hv = torch.autograd.grad(dot, leaves, allow_unused=True)
            else:
                hv = [None] * len(leaves)
        delta = self.opts["delta"]
        total = {}
        for n, g, h in zip(names, grads, hv):
            t = torch.zeros_like(theta[n]) if h is None else h
            if delta:
                t = t + delta * (torch.zeros_like(theta[n]) if g is None else g.detach())
            total[n] = t
        self.add_weight_scores(lambda: {n: theta[n] * t for n, t in total.items()})
        self.add("member_scores", self.channels(theta, total))

    def finalize(self) -> Result:
        layout = self.ctx.layout if self.per_weight else gate_layout(self.ctx)
        nb = self.count("batches")
        members = (self.acc["member_scores"] / nb).abs()
        how = self.opts["group_reduction"]
        if how == "mean":
            channels = layout.group_mean_nonzero(members)
        elif how == "sum":
            channels = layout.group_sum(members)
        else:
            channels = layout.group_amax(members)
        if self.opts["normalize"] == "max":
            top = layout.group_max(channels)
            channels = torch.where(top > 0, channels / top.clamp_min(torch.finfo(channels.dtype).tiny), channels)
        return Result(layout.split(channels), self.weight_scores(nb))
