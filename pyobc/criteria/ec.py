"""Elimination-compensation (EC) pruning scores with optimal bias shifts [reconstructed].

After Ballini, Muscarnera et al., "Elimination-compensation pruning for fully-connected neural networks"
(arXiv 2602.20467, no public code). The formulas below are a principled reconstruction — they could not
be checked against the paper's full text — extended to conv layers and to whole channels.

Neuron-local model
------------------
Let a layer (``nn.Linear`` or a non-transposed ``nn.Conv1d/2d/3d``) compute ``z_i = b_i + sum_j W_ij a_j``;
for a conv, ``a_j`` is element ``j = (c, kernel tap)`` of the unfolded input patch at output position
``p``, and the bias is shared by all positions. Removing ``w = W_ij`` and shifting ``b_i`` by ``beta``
changes ``z_{n,i,p}`` by ``beta - w a_{n,j,p}`` and nothing else. With a per-element curvature weight
``phi_{n,i,p}`` of the *per-sample* loss ``l_n`` (the diagonal of its Hessian in pre-activation space,
see below), the second-order loss change is

    dL(beta) = 1/2 E[ phi_i (beta - w a_j)^2 ]
             = 1/2 (w^2 h_ww - 2 w beta h_wb + beta^2 h_bb)

    h_bb,i  = E[phi_i],   h_wb,ij = E[phi_i a_j],   h_ww,ij = E[phi_i a_j^2],

where ``E`` is the **mean over samples and the sum over positions** (and over repeated calls of the
layer): ``E[.] = 1/N sum_n sum_p (.)``, ``N`` counting all samples of all batches. With this scaling the
``h`` are the curvature of the mean loss ``L = 1/N sum_n l_n`` (the loss ``pyobc.score`` requires) in
``(W_ij, b_i)`` under the neuron-local model (``h_bb,i = d^2 L / d b_i^2`` etc.; exact for linear layers
of ReLU nets), so a score is the predicted change of that mean loss, on the same scale as OBD's
``1/2 theta^2 F``, and a batch split into parts gives the same result. Minimising over ``beta``:

    beta*_ij = w h_wb,ij / h_bb,i                         (the optimal bias shift)
    I_ij     = 1/2 w^2 (h_ww,ij - h_wb,ij^2 / h_bb,i)     (the compensated loss change, the score)
             = 1/2 w^2 h_bb,i Var_phi(a_j)                (phi-weighted variance over samples/positions)

All weights of a layer come from three reductions of activation-shaped tensors, no loop over samples or
weights: linear ``H_wb = Phi^T A``, ``H_ww = Phi^T (A o A)``, ``h_bb = sum Phi``; conv ``H_wb`` and
``H_ww`` are convolution weight gradients with ``phi`` as the output gradient and ``x`` resp. ``x^2`` as
the input (``unfold(x)^2 = unfold(x^2)`` under zero padding; other padding modes are applied first).

After pruning a set of weights of row ``i``, ``b_i += sum over pruned j of beta*_ij`` (a sum of
per-weight shifts; exact in the neuron-local linear model because the shift is linear in the removed
weights). Never use a first-order (gradient-only) shift.

A layer **without bias** gets ``I_ij = 1/2 w^2 h_ww,ij`` (no compensation) and shift 0. Where
``h_bb,i <= 0`` (a dead unit, or a non-convex loss), the shift is 0 and the score uncompensated too.

Curvature (option ``curvature``)
--------------------------------
``"ggn"`` (default): ``phi_{n,i,p} = J^T Lambda_n J`` with ``J = d f(x_n) / d z_{n,i,p}`` and
``Lambda_n = d^2 l_n / d f^2`` the output-space Hessian of the per-sample loss — the Gauss-Newton
diagonal in pre-activation space. ``Lambda_n = N * d^2 L / d f_n^2`` comes from one Hessian-vector
product of the loss head per output dimension (the mean loss is block-diagonal over samples, so one
product gives column ``d`` of every ``Lambda_n``), its eigendecomposition ``Q diag(lambda) Q^T``, and
one backward pass through the network per (non-null) eigen-direction with per-sample cotangents
``sqrt(lambda_nk) q_nk``: ``phi = sum_k lambda_k (q_k^T J)^2``. That is **one backward per output
dimension** (classifiers: classes - 1, since cross-entropy's Hessian has a null direction; with many
outputs, e.g. 1000 classes, prefer ``"fisher"``; past ``max_outputs`` output elements per sample, 1024
by default — a language model's tokens x vocabulary — ``ECCostError`` refuses before the cost is paid,
naming ``curvature="fisher"``). For ReLU
networks (piecewise-linear after ``z``: ReLU, max-pool, eval-mode BatchNorm, residual adds, pooling,
linear/conv) this is the exact diagonal Hessian of ``l_n`` in ``z``. Model outputs must carry the sample
axis first.

``"fisher"``: the empirical version ``phi_{n,i,p} = (d l_n / d z_{n,i,p})^2 = (N dL/dz)^2``: one backward.

For convs ``phi`` is the per-position diagonal: cross-position curvature terms of one channel are
dropped (exact when a position's pre-activation only reaches the loss through its own position, e.g.
1x1 heads with per-pixel losses). Across units ``i`` the model is diagonal too (one unit's shift
does not compensate another unit's loss).

Structured variant (``granularity="channel"``, and the group scores of ``granularity="weight"``)
-------------------------------------------------------------------------------------------------
Removing channel ``c`` of a group means that every consumer (``in`` member, a linear or conv layer)
stops reading its input channel(s) ``S_c`` (one input channel, or several in-features after a flatten).
For consumer output unit ``i`` the removed contribution is

    u_{n,i,c,p} = sum_{j in S_c} sum_{taps t} W_{i,j,t} a_{n,(j,t),p}

(for a conv: the single-input-channel convolution of channel ``c`` with kernel ``W[i, c]``, at output
position ``p``). The same neuron-local argument with ``beta - u`` in place of ``beta - w a`` gives

    beta*_ic = E[phi_i u_ic] / h_bb,i = sum_{j in S_c, t} beta*_{i,(j,t)}    (sum of per-weight shifts)
    score_c  = sum_i 1/2 (E[phi_i u_ic^2] - E[phi_i u_ic]^2 / h_bb,i)
             = sum_i 1/2 h_bb,i Var_phi(u_ic)

summed over the group's conv/linear in-members (consumers are treated independently; producer rows,
norm channels and other members add nothing: once consumers stop reading a channel, they no longer
matter). ``E[phi u^2]`` needs ``u`` for every (input channel, output unit, position): patches times
kernels, formed a few samples at a time so that they stay in cache (the multiply-adds of one forward of
the consumers; on CPU this memory-bound pass dominates the cost of conv nets' structured scores; for
linear consumers with one in-feature per channel it is one matrix product). Relation to the weight variant: the
shift is the same sum of per-weight shifts; the score equals the sum of the per-weight scores
``I_ij`` over the removed column when each root channel is one in-feature of a linear consumer, and
otherwise adds the cross-tap (cross-feature) covariances ``sum_{t != t'} 1/2 h_bb W_t W_t' Cov_phi(a_t,
a_t')`` — the joint removal of the channel's weights, not the sum of independent removals. Groups
without a conv/linear consumer score 0.

Outputs
-------
* ``by_module()``: the structured scores above (per group root channel; higher = more important).
* ``by_parameter()`` (``granularity="weight"``): ``I`` (raw, mean over the data as defined) for the weight
  of every linear/conv layer the forward calls (classifier heads included). Biases get **no entry**
  (they are not pruned; they receive the compensation), nor do norm/other parameters, transposed convs
  and layers whose forward is not called (e.g. ``MultiheadAttention.out_proj``).
* ``extras["ec_shift"][weight name]``: ``beta*_ij`` shaped like the weight (``granularity="weight"``).
* ``extras["ec_channel_shift"][consumer module]``: ``(out, in)`` matrix over the consumer's own
  (group-expanded) input channels, or in-features for linear layers: removing root channels ``R`` of a
  group adds, for every in-member ``m`` of it, ``shift[:, m.index[isin(m.root, R)]].sum(1)`` to the
  consumer's bias (all zeros for a consumer without bias).
* ``extras["ec_curvature"]``: the curvature used.

All state is kept in additive accumulators (sums over samples and positions, and the sample count),
so data-parallel scoring only has to add them up. They are float64 (the score is a difference of two
moments) and hold only what the scores read: for channel scores ``sum over taps of W h_wb`` per (out,
in-channel) of each consumer and ``sum_i E[phi u^2]`` per root channel — one float64 per (out,
in-channel), a kernel's taps times less than a weight-sized accumulator; ``granularity="weight"`` keeps
``h_wb`` and ``h_ww`` per weight.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import CONV, is_transposed_linear
from . import register
from .base import Criterion, Result, model_outputs

__all__ = ["EC", "ECCostError"]

#: bytes of temporaries materialised at once by the structured pass (linear layers)
MEMORY_BUDGET = 256 * 2**20
#: bytes of per-(input channel, output unit) conv contributions formed at once: small enough to stay in
#: cache while they are squared, weighted and summed (several times faster than one big tensor)
CACHE_BUDGET = 2 * 2**20

class ECCostError(ValueError):
    """The Gauss-Newton curvature would cost more backward passes than ``max_outputs`` allows."""


_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _qual(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _scorable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return True
    return (isinstance(module, CONV) and not module.transposed
            and module.weight.dim() - 2 in _CONV_WEIGHT)


def _conv_input(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``x`` padded as the layer pads it (for string / non-zero padding), and the padding left to pass."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0
    return x, module.padding


def _chunk(n: int, per_row_bytes: int, budget: int = MEMORY_BUDGET) -> list[slice]:
    step = max(1, budget // max(1, per_row_bytes))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


@register
class EC(Criterion):
    __doc__ = __doc__  # the module's: formulas, scaling, options and outputs

    name = "ec"
    description = ("elimination-compensation [reconstructed]: 1/2 w^2 (h_ww - h_wb^2/h_bb) with the optimal "
                   "bias shift w h_wb/h_bb, per weight and per channel")
    granularities = ("channel", "weight")
    defaults = {"curvature": "ggn", "max_outputs": 1024}

    def validate(self) -> None:
        self._choice("curvature", ("ggn", "fisher"))
        limit = self.opts["max_outputs"]
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"method 'ec': option max_outputs must be a positive integer or None, got {limit!r}")
        ctx = self.ctx
        # consumers: conv/linear in-members of the groups -> [(group index, member index, member)]
        self._consumers: dict[str, list[tuple[int, int, Any]]] = {}
        for gi, g in enumerate(ctx.groups):
            for mi, m in enumerate(g.members):
                module = ctx.modules.get(m.module)
                if (m.kind == "in" and module is not None and _scorable(module) and m.module in ctx.called
                        and _qual(m.module, "weight") in ctx.params):
                    self._consumers.setdefault(m.module, []).append((gi, mi, m))
        scored = dict.fromkeys(self._consumers)
        if self.per_weight:
            for name, module in ctx.modules.items():
                if _scorable(module) and name in ctx.called and _qual(name, "weight") in ctx.params:
                    scored[name] = None
        self._scored = {name: ctx.modules[name] for name in scored}
        self._acc_dtype = None

    # -- per batch -----------------------------------------------------------------------------------
    def update(self, batch) -> None:
        ctx = self.ctx
        outputs: list = []
        loss, cap = ctx.capture_forward(batch, self._scored, outputs=outputs)
        calls = [(name, rec) for name, recs in cap.records.items() for rec in recs
                 if isinstance(rec.y, torch.Tensor) and isinstance(rec.x, torch.Tensor)]
        zs = [rec.y for _, rec in calls]
        phis = self._curvature(loss, outputs, zs, float(batch.size))
        weight_mode = self.per_weight
        for (name, rec), phi in zip(calls, phis):
            module = self._scored[name]
            x = rec.x.detach()
            if phi is None:
                phi = torch.zeros_like(rec.y, dtype=x.dtype)
            self._accumulate(name, module, x, phi, weight_mode)
        for name in self._scored:  # every key exists after the first batch (for data-parallel reduction)
            self._ensure(name)
        self.add("samples", batch.size)

    def _curvature(self, loss: torch.Tensor, outputs: list, zs: list[torch.Tensor],
                   n: float) -> list[torch.Tensor | None]:
        """``phi`` (shaped like each ``z``) for the chosen curvature."""
        need = [i for i, z in enumerate(zs) if z.requires_grad]
        phis: list[torch.Tensor | None] = [None] * len(zs)
        if not need:
            return phis
        targets = [zs[i] for i in need]
        if self.opts["curvature"] == "fisher":
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
            for i, g in zip(need, grads):
                phis[i] = None if g is None else (g.detach() * n).square()
            return phis
        fs = model_outputs(outputs)
        if not fs:
            raise RuntimeError("ec's Gauss-Newton curvature needs the model's outputs, but loss_fn did not call "
                               "the model (or its outputs do not depend on the parameters); "
                               "use curvature='fisher'")
        self._check_output_size(fs)
        lam, q = self._output_hessian(loss, fs, n)
        if lam is None:
            return phis
        sizes = [f[0].numel() for f in fs]
        tol = lam.abs().max() * lam.shape[-1] * torch.finfo(lam.dtype).eps * 16
        acc: list[torch.Tensor | None] = [None] * len(targets)
        for k in range(lam.shape[-1]):
            for sign in (1.0, -1.0):
                weight = (sign * lam[:, k]).clamp_min(0)
                if not bool((weight > tol).any()):
                    continue
                cot = (q[:, :, k] * weight.sqrt().unsqueeze(1)).split(sizes, dim=1)
                cots = [c.reshape(f.shape).to(f.dtype) for c, f in zip(cot, fs)]
                rs = torch.autograd.grad(fs, targets, grad_outputs=cots, retain_graph=True, allow_unused=True)
                for t, r in enumerate(rs):
                    if r is None:
                        continue
                    r2 = r.detach().square()
                    if sign < 0:
                        r2 = -r2
                    acc[t] = r2 if acc[t] is None else acc[t] + r2
        for i, a in zip(need, acc):
            phis[i] = a
        return phis

    def _check_output_size(self, fs: list[torch.Tensor]) -> None:
        """The Gauss-Newton curvature costs one backward pass per output element of a sample (and an
        eigendecomposition of that size): refuse before paying it for outputs like a language model's
        (tokens x vocabulary), where the empirical Fisher is the affordable curvature."""
        limit = self.opts["max_outputs"]
        size = sum(f[0].numel() for f in fs if f.dim() > 0)
        if limit is not None and size > limit:
            raise ECCostError(
                f"ec with curvature='ggn' needs one backward pass per output element of a sample: {size} here "
                f"(outputs of shape {[tuple(f.shape[1:]) for f in fs]} per sample), over max_outputs={limit}: "
                "use curvature='fisher' (one backward per batch), or raise max_outputs to pay for it")

    @staticmethod
    def _output_hessian(loss: torch.Tensor, fs: list[torch.Tensor], n: float):
        """Eigen-decomposition of every sample's output-space loss Hessian ``Lambda_n = N d^2L/df_n^2``.

        Returns ``(lambda (S, D), Q (S, D, D))`` with ``D`` the per-sample output dimension.
        """
        rows = fs[0].shape[0]
        for f in fs:
            if f.dim() == 0 or f.shape[0] != rows:
                raise ValueError("ec's Gauss-Newton curvature needs model outputs with the sample axis first "
                                 f"(got shapes {[tuple(t.shape) for t in fs]}); use curvature='fisher'")
        gf = torch.autograd.grad(loss, fs, create_graph=True, allow_unused=True)
        pairs = [(f, g) for f, g in zip(fs, gf)]
        if all(g is None or not g.requires_grad for g in gf):
            return None, None  # the loss is linear in the outputs (or does not use them): no curvature
        sizes = [f[0].numel() for f in fs]
        d_total = sum(sizes)
        cols = []
        for d in range(d_total):
            vs = []
            off = 0
            for f, size in zip(fs, sizes):
                v = torch.zeros(rows, size, dtype=f.dtype, device=f.device)
                if off <= d < off + size:
                    v[:, d - off] = 1
                vs.append(v.reshape(f.shape))
                off += size
            use = [(g, v) for (f, g), v in zip(pairs, vs) if g is not None and g.requires_grad]
            hv = torch.autograd.grad([g for g, _ in use], fs, grad_outputs=[v for _, v in use],
                                     retain_graph=True, allow_unused=True)
            cols.append(torch.cat([(h.detach() if h is not None else torch.zeros_like(f)).reshape(rows, -1)
                                   for h, f in zip(hv, fs)], dim=1))
        lam_mat = torch.stack(cols, dim=2) * n  # (S, D, D): column d of every Lambda_n
        lam_mat = 0.5 * (lam_mat + lam_mat.transpose(1, 2))
        work = lam_mat if lam_mat.dtype in (torch.float32, torch.float64) else lam_mat.float()
        lam, q = torch.linalg.eigh(work)
        return lam, q

    # -- accumulation ----------------------------------------------------------------------------------
    def _acc(self, t: torch.Tensor) -> torch.Tensor:
        if self._acc_dtype is None:
            self._acc_dtype = torch.float64 if t.device.type in ("cpu", "cuda") else t.dtype
        return t.to(self._acc_dtype)

    def _weight(self, name: str, theta: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Layer ``name``'s weight as (out, in, ...): a transposed linear layer (Hugging Face ``Conv1D``)
        stores it (in, out)."""
        w = (self.ctx.params if theta is None else theta)[_qual(name, "weight")]
        module = self._scored.get(name)
        return w.t() if is_transposed_linear(self.ctx.modules[name] if module is None else module) else w

    def _ensure(self, name: str) -> None:
        w = self._weight(name)
        zeros = (lambda shape: self._acc(torch.zeros(shape, dtype=w.dtype, device=w.device)))
        if f"bb:{name}" not in self.acc:
            self.add(f"bb:{name}", zeros(w.shape[0]))
        if self.per_weight:
            for key in (f"wb:{name}", f"ww:{name}"):
                if key not in self.acc:
                    self.add(key, zeros(w.shape))
        elif f"wbc:{name}" not in self.acc:
            self.add(f"wbc:{name}", zeros(w.shape[:2]))
        for gi, mi, m in self._consumers.get(name, ()):
            if f"uu:{gi}:{mi}" not in self.acc:
                self.add(f"uu:{gi}:{mi}", zeros(self.ctx.groups[gi].size))

    def _accumulate(self, name: str, module: nn.Module, x: torch.Tensor, phi: torch.Tensor,
                    weight_mode: bool) -> None:
        w = self._weight(name).detach()
        phi = phi.to(x.dtype)
        if isinstance(module, nn.Linear) or is_transposed_linear(module):
            xr = x.reshape(-1, x.shape[-1])
            pr = phi.reshape(-1, phi.shape[-1])
            self.add(f"bb:{name}", self._acc(pr.sum(0)))
            self._add_wb(name, w, pr.t().mm(xr), weight_mode)
            x2 = None
            if weight_mode:
                x2 = pr.t().mm(xr * xr)
                self.add(f"ww:{name}", self._acc(x2))
            for gi, mi, m in self._consumers.get(name, ()):
                uu = self._linear_uu(m, w, xr, pr, x2, self.ctx.groups[gi].size)
                self.add(f"uu:{gi}:{mi}", self._acc(uu).sum(0))
            return
        # conv
        if x.dim() == w.dim() - 1:  # unbatched call
            x, phi = x.unsqueeze(0), phi.unsqueeze(0)
        xp, padding = _conv_input(module, x)
        wgrad = _CONV_WEIGHT[w.dim() - 2]
        args = (module.stride, padding, module.dilation, module.groups)
        self.add(f"bb:{name}", self._acc(phi.transpose(0, 1).reshape(phi.shape[1], -1).sum(1)))
        self._add_wb(name, w, wgrad(xp, w.shape, phi, *args), weight_mode)
        if weight_mode:
            self.add(f"ww:{name}", self._acc(wgrad(xp * xp, w.shape, phi, *args)))
        for gi, mi, m in self._consumers.get(name, ()):
            uu = self._conv_uu(module, m, w, xp, padding, phi, self.ctx.groups[gi].size)
            self.add(f"uu:{gi}:{mi}", self._acc(uu).sum(0))

    def _add_wb(self, name: str, w: torch.Tensor, wb: torch.Tensor, weight_mode: bool) -> None:
        """Accumulate ``h_wb`` per weight (``granularity="weight"``) or, for channel scores, only what
        they read of it: ``sum over taps of W h_wb`` per (out, in-channel), linear in ``h_wb`` and a
        kernel's taps times smaller (the float64 accumulators are the weight-sized part of ec's memory)."""
        if weight_mode:
            self.add(f"wb:{name}", self._acc(wb))
        else:
            self.add(f"wbc:{name}", self._acc((w * wb).reshape(w.shape[0], w.shape[1], -1).sum(-1)))

    @staticmethod
    def _linear_uu(m, w: torch.Tensor, xr: torch.Tensor, pr: torch.Tensor, x2: torch.Tensor | None,
                   size: int) -> torch.Tensor:
        """``sum over rows of phi_i u_ic^2`` as an ``(out, size)`` matrix for one in-member of a linear layer."""
        idx, roots = m.index.to(w.device), m.root.to(w.device)
        out = torch.zeros(w.shape[0], size, dtype=w.dtype, device=w.device)
        if idx.numel() == 0:
            return out
        if torch.unique(roots).numel() == roots.numel():  # one in-feature per root channel: u = W_ij a_j
            h = x2[:, idx] if x2 is not None else pr.t().mm(xr[:, idx].square())
            return out.index_add_(1, roots, w[:, idx].square() * h)
        ws = w[:, idx]  # (O, J)
        per_row = ws.numel() * ws.element_size() * 2
        for sl in _chunk(xr.shape[0], per_row):
            u = xr[sl, idx].unsqueeze(1) * ws.unsqueeze(0)  # (R, O, J)
            uc = torch.zeros(u.shape[0], w.shape[0], size, dtype=w.dtype, device=w.device).index_add_(2, roots, u)
            out += (uc.square() * pr[sl].unsqueeze(-1)).sum(0)
        return out

    @staticmethod
    def _conv_uu(module: nn.modules.conv._ConvNd, m, w: torch.Tensor, xp: torch.Tensor, padding: Any,
                 phi: torch.Tensor, size: int) -> torch.Tensor:
        """``sum over samples, positions of phi_i u_ic^2`` as ``(out, size)`` for one in-member of a conv.

        ``u[n, c]`` for every (selected input channel, output unit) is ``W[:, c] (out x taps) @
        patches(x)[n, c] (taps x positions)``, formed a few samples at a time so that it stays in cache
        while it is squared, weighted and summed."""
        idx, roots = m.index.to(w.device), m.root.to(w.device)
        o = w.shape[0]
        out = torch.zeros(o, size, dtype=w.dtype, device=w.device)
        if idx.numel() == 0:
            return out
        groups = module.groups
        i_g, o_g = w.shape[1], o // groups
        unique = torch.unique(roots).numel() == roots.numel()
        taps = w[0, 0].numel()
        ws = w[:, idx % i_g].transpose(0, 1).reshape(idx.numel(), o, taps)  # (J, O, taps)
        if groups > 1:  # output i only reads input channels of its own group
            same = (torch.arange(o, device=w.device) // o_g).unsqueeze(0) == (idx // i_g).unsqueeze(1)
            ws = ws * same.unsqueeze(-1).to(ws.dtype)
        positions = math.prod(phi.shape[2:])
        per_channel = o * positions * xp.element_size()  # bytes of u per sample and input channel
        j_all = idx.numel()
        j_step = j_all if not unique else max(1, min(j_all, CACHE_BUDGET // per_channel))
        for j0 in range(0, j_all, j_step):
            js = slice(j0, min(j_all, j0 + j_step))
            j = js.stop - js.start
            xs = xp.index_select(1, idx[js])
            wj = ws[js]
            for sl in _chunk(xs.shape[0], j * per_channel, CACHE_BUDGET):
                u = EC._conv_u(module, xs[sl], wj, padding)  # (n, J, O, P)
                if not unique:
                    u = torch.zeros(u.shape[0], size, o, positions, dtype=u.dtype,
                                    device=u.device).index_add_(1, roots, u)
                s = u.square_().mul_(phi[sl].reshape(u.shape[0], 1, o, positions)).sum((0, 3))
                if unique:
                    out.index_add_(1, roots[js], s.t())
                else:
                    out += s.t()
        return out

    @staticmethod
    def _conv_u(module: nn.modules.conv._ConvNd, xs: torch.Tensor, ws: torch.Tensor, padding: Any) -> torch.Tensor:
        """Per-input-channel contributions ``u (n, J, O, positions)`` of the channels ``xs (n, J, ...)``
        with kernels ``ws (J, O, taps)``: patches (strided views, copied once) times the kernels."""
        n, j = xs.shape[0], xs.shape[1]
        d = xs.dim() - 2
        pad = tuple(padding) if isinstance(padding, (tuple, list)) else (int(padding),) * d
        if any(pad):
            xs = F.pad(xs, [q for p in reversed(pad) for q in (p, p)])
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        for k in range(d):  # (n, J, *out, *span): windows of every spatial dim
            xs = xs.unfold(2 + k, (kernel[k] - 1) * dilation[k] + 1, stride[k])
        if any(dl > 1 for dl in dilation):
            xs = xs[(Ellipsis,) + tuple(slice(None, None, dl) for dl in dilation)]
        order = (0, 1) + tuple(range(2 + d, 2 + 2 * d)) + tuple(range(2, 2 + d))
        a = xs.permute(order).reshape(n, j, ws.shape[2], -1)  # (n, J, taps, positions)
        return torch.matmul(ws, a)

    # -- results -----------------------------------------------------------------------------------------
    def _ratio(self, name: str) -> torch.Tensor | None:
        """``h_wb / h_bb`` of layer ``name`` (0 where there is no compensation; None if it never ran):
        per weight, or summed over taps with the weights (``wbc``) for channel scores. One layer at a
        time, so that finalising holds one weight-sized temporary, not one per layer."""
        module = self._scored[name]
        if f"bb:{name}" not in self.acc:
            return None
        bb = self.acc[f"bb:{name}"]
        # channel scores read wbc once: finalize (called once, after any data-parallel reduction) frees it
        # as it goes, so the float64 accumulators and the float32 channel shifts never coexist whole
        wb = self.acc[f"wb:{name}"] if self.per_weight else self.acc.pop(f"wbc:{name}")
        if module.bias is None:
            return torch.zeros_like(wb)
        ok = bb > 0
        r = torch.where(ok, 1 / torch.where(ok, bb, torch.ones_like(bb)), torch.zeros_like(bb))
        scale = r.reshape((-1,) + (1,) * (wb.dim() - 1))
        return wb * scale if self.per_weight else wb.mul_(scale)

    def finalize(self) -> Result:
        ns = self.count("samples")
        extras: dict[str, Any] = {"ec_curvature": self.opts["curvature"], "ec_channel_shift": {}}
        parameter = None
        if self.per_weight:
            parameter, extras["ec_shift"] = self._weight_scores(ns)
        channel = [torch.zeros(g.size, dtype=torch.float64, device=self.ctx.device) for g in self.ctx.groups]
        theta = self.ctx.theta  # a dict over every parameter: built once, not per consumer
        for name, members in self._consumers.items():
            ratio = self._ratio(name)
            if ratio is None:
                continue
            w = self._weight(name, theta)
            o = w.shape[0]
            # per (out i, local in-channel): sum over taps of W * h_wb / h_bb = the channel's shift
            if self.per_weight:
                col = (w.to(ratio.dtype) * ratio).reshape(o, w.shape[1], -1).sum(-1)
            else:  # accumulated already summed over taps (_add_wb)
                col = ratio
            del ratio
            full = self._group_expanded(self._scored[name], col)
            extras["ec_channel_shift"][name] = full.to(w.dtype).cpu()
            bb = self.acc[f"bb:{name}"]
            for gi, mi, m in members:
                size = self.ctx.groups[gi].size
                idx, roots = m.index.to(full.device), m.root.to(full.device)
                shift = torch.zeros(o, size, dtype=full.dtype, device=full.device).index_add_(1, roots, full[:, idx])
                # sum_i E[phi u^2] - E[phi u]^2 / h_bb = sum_i uu - (beta* h_bb)^2 / h_bb = uu - beta*^2 h_bb;
                # uu is linear in the data, so it is accumulated already summed over outputs i
                per_channel = self.acc[f"uu:{gi}:{mi}"] - (shift.square() * bb.unsqueeze(1)).sum(0)
                channel[gi] = channel[gi] + 0.5 * per_channel / ns
        return Result([c.to(self._out_dtype()) for c in channel], parameter, extras)

    def _weight_scores(self, ns: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``granularity="weight"``: ``I`` and ``beta*`` per weight of every scored layer (stored layout)."""
        parameter, shifts = {}, {}
        theta = self.ctx.theta
        for name in self._scored:
            ratio = self._ratio(name)
            if ratio is None:
                continue
            wname = _qual(name, "weight")
            w = self._weight(name, theta)
            wd = w.to(ratio.dtype)
            ww, wb = self.acc[f"ww:{name}"], self.acc[f"wb:{name}"]
            score = 0.5 * wd.square() * (ww - wb * ratio) / ns
            back = (lambda t, n=name: t.t() if is_transposed_linear(self._scored[n]) else t)  # stored layout
            parameter[wname] = back(score.to(w.dtype))
            shifts[wname] = back((wd * ratio).to(w.dtype)).cpu()
        return parameter, shifts

    @staticmethod
    def _group_expanded(module: nn.Module, col: torch.Tensor) -> torch.Tensor:
        """``col (O, I_g)`` over a grouped conv's group-expanded input channels ``(O, groups * I_g)``,
        zero where output ``i`` does not read the channel."""
        groups = getattr(module, "groups", 1) if isinstance(module, CONV) else 1
        if groups == 1:
            return col
        o, i_g = col.shape
        same = ((torch.arange(o, device=col.device) // (o // groups)).unsqueeze(1)
                == (torch.arange(groups * i_g, device=col.device) // i_g).unsqueeze(0))
        return col.repeat(1, groups) * same

    def _out_dtype(self) -> torch.dtype:
        return torch.float64 if any(p.dtype == torch.float64 for p in self.ctx.params.values()) else torch.float32
