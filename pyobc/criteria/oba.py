"""Optimal Brain Apoptosis (Sun et al., ICLR 2025): second-order Taylor with exact Hessian blocks."""
from __future__ import annotations

import re
import warnings

import torch
from torch.autograd import forward_ad
from ..layers import BATCH_NORMS, WEIGHT_LAYERS, is_norm_layer
from ..scoring.gates import GatedModel, gate_layout, second_order_mode
from . import register
from .base import Criterion, Result, model_outputs, validate_micro_batch


def output_cotangents(loss: torch.Tensor, outputs: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's outputs ``z`` that the loss uses, and ``dL/dz`` (detached) for each."""
    zs = model_outputs(outputs)
    if not zs:
        raise RuntimeError("OBA's inter-layer Hessian needs the model's outputs, but loss_fn did not call the "
                           "model (or its outputs do not depend on the parameters)")
    cs = torch.autograd.grad(loss, zs, retain_graph=True, allow_unused=True)
    pairs = [(z, c.detach()) for z, c in zip(zs, cs) if c is not None]
    if not pairs:
        raise RuntimeError("OBA's inter-layer Hessian: the loss does not depend on the model's outputs")
    return [z for z, _ in pairs], [c for _, c in pairs]


def linearised(loss: torch.Tensor, outputs: list) -> torch.Tensor:
    """``<stopgrad(dL/dz), z>`` over the model's outputs ``z``: its Hessian in theta is ``H - GGN``."""
    zs, cs = output_cotangents(loss, outputs)
    return torch.stack([(c * z).sum() for z, c in zip(zs, cs)]).sum()


def _conv_bn_only(model: torch.nn.Module) -> bool:
    """Whether every module with parameters of its own is a conv, linear or batch-norm layer."""
    return all(isinstance(m, WEIGHT_LAYERS + BATCH_NORMS) for m in model.modules()
               if next(m.parameters(recurse=False), None) is not None)


@register
class OBA(Criterion):
    """Per weight, per batch: ``S = theta * (H - GGN) v`` with ``v = theta`` on conv/linear weights and
    biases (and on attention projections, embeddings and bare parameters) and ``v = 0`` on norm
    parameters. ``H - GGN = sum_k (dL/dz_k) d^2 z_k`` keeps exactly the Hessian blocks *between* layers
    that feed one another or whose outputs are multiplied (attention's q k^T and A v); the blocks within
    a conv/linear layer are zero. Second derivatives of nonlinearities (GELU, softmax, LayerNorm) are
    kept exactly — pyobc differentiates the real network, in eval mode (BatchNorm is affine there).

    Channel scores come from one second-order pass of per-channel gates (see
    :mod:`pyobc.scoring.gates`); no weight gradients, cost flat in depth. Option ``ad``:
    ``"forward"``: forward-over-reverse (``eps`` is a forward-mode tangent, one reverse pass on dual
    tensors gives the mixed second derivatives, no graph of the backward pass is kept);
    ``"reverse"``: two reverse passes (reverse-over-reverse); ``"auto"`` (default): forward for
    models whose parameterised layers are all conv, linear or batch norm (where the lean ops make it
    the cheaper one: 10-30% on the CIFAR ResNets), reverse otherwise (forward mode doubles every op of
    LayerNorm, attention and GELU: 1.5x slower on a small ViT). Both give the same scores up to
    rounding. Aggregation (reference
    defaults): per batch, signed sum of S over each member's parameters; per member ``|mean over
    batches|``; per group ``group_reduction`` over members (``"mean"`` of the non-zero members,
    ``"sum"`` or ``"max"``); then ``normalize="max"`` divides by the group maximum (``"none"`` keeps
    raw values).

    Options: ``hessian="inter-layer"`` (default) or ``"full"`` (``theta * H theta`` over all
    parameters, the authors' "FastOBA"); ``delta`` adds ``delta * theta * g`` (first-order term, 0);
    ``micro_batch`` (16): the second-order pass runs over micro-batches of this many samples and adds
    them with weights ``n_i / N`` — exact for losses that are means of per-sample terms (checked once).
    The pass keeps about 2.5x the activations of a plain forward+backward (values and tangents), so
    this bounds peak memory (1.2-1.4x a forward+backward of a 64-sample batch on the CIFAR ResNets, 2.1x
    with 32); ``None`` processes whole batches (fewest passes, most memory).
    Per-weight scores (``granularity="weight"``): the raw S averaged over batches (no abs).
    """

    name = "oba"
    description = "Optimal Brain Apoptosis: theta*(H-GGN)theta from one exact Hessian-vector product per batch"
    granularities = ("channel", "weight")
    defaults = {"hessian": "inter-layer", "delta": 0.0, "group_reduction": "mean", "normalize": "max",
                "micro_batch": 16, "ad": "auto"}

    def validate(self) -> None:
        self._choice("hessian", ("inter-layer", "full"))
        self._choice("group_reduction", ("mean", "sum", "max"))
        self._choice("normalize", ("max", "none"))
        if not isinstance(self.opts["delta"], (int, float)) or isinstance(self.opts["delta"], bool):
            raise TypeError(f"method 'oba': option delta must be a number, got {self.opts['delta']!r}")
        validate_micro_batch(self.name, self.opts["micro_batch"])
        self._choice("ad", ("auto", "forward", "reverse"))
        ad = self.opts["ad"]
        if ad == "auto":
            ad = "forward" if _conv_bn_only(self.ctx.model) else "reverse"
        # also set when an op of the model turns out to have no forward-mode derivative
        self._reverse_only = ad == "reverse"

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
        if not self._reverse_only:
            try:
                return self._update_channels_forward(batch, weight)
            except NotImplementedError as exc:  # an op whose backward has no forward-mode formula
                if not re.search(r"forward (mode )?AD", str(exc)):
                    raise
                warnings.warn(f"pyobc: method 'oba': {str(exc).splitlines()[0]} — scoring with two reverse "
                              "passes instead (the same scores; slower, and it keeps the backward's graph)",
                              stacklevel=2)
                self._reverse_only = True
        self._update_channels_reverse(batch, weight)

    def _scope(self) -> str:
        return "linear" if self.opts["hessian"] == "inter-layer" else "all"

    def _update_channels_forward(self, batch, weight: float) -> None:
        """Forward-over-reverse: ``eps`` is a forward-mode scalar (tangent 1) and one reverse pass, run on
        dual tensors, gives every gate's ``dL/d alpha`` (primal) and ``d^2 L / d alpha d eps`` (tangent).
        Nothing is differentiated twice in reverse mode, so no graph of the backward pass is kept."""
        with forward_ad.dual_level():
            gm = GatedModel(self.ctx, eps_scope=self._scope(), unit_gates=True)
            loss, outputs = gm.run(batch)
            # no second_order_mode here: its overrides act on the forward's functions, and the reverse
            # pass runs no graph of its own (the mode's check on every torch call is pure overhead)
            if self.opts["hessian"] == "inter-layer":  # reverse pass of <stopgrad(dL/dz), z>
                zs, cs = output_cotangents(loss, outputs)
                cs = [forward_ad.unpack_dual(c).primal * weight for c in cs]  # constant in eps too
                grads = torch.autograd.grad(zs, gm.gates, grad_outputs=cs, allow_unused=True)
            else:
                grads = torch.autograd.grad(loss * weight, gm.gates, allow_unused=True)
            parts = [forward_ad.unpack_dual(a) if a is not None else (None, None) for a in grads]
        self._add_members(gm, [p for p, _ in parts], [t for _, t in parts])

    def _update_channels_reverse(self, batch, weight: float) -> None:
        """Reverse-over-reverse, for models with an op that forward mode cannot differentiate through:
        ``dL/d(eps, alpha)`` with the graph kept, then the derivative of ``dL/d eps`` w.r.t. the gates."""
        gm = GatedModel(self.ctx, eps_scope=self._scope())
        loss, outputs = gm.run(batch)
        with second_order_mode():
            objective = self._objective(loss, outputs) * weight
            first = torch.autograd.grad(objective, [gm.eps] + gm.gates, create_graph=True, allow_unused=True)
            s, a1 = first[0], first[1:]
            a2 = (torch.autograd.grad(s, gm.gates, allow_unused=True) if s is not None and s.requires_grad
                  else [None] * len(gm.gates))
        self._add_members(gm, a1, a2)

    def _add_members(self, gm: GatedModel, first: list, second: list) -> None:
        """Accumulate member scores from the gates' first and mixed second derivatives."""
        g_members = gm.members(first).detach()
        h_members = gm.members(second).detach()
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
