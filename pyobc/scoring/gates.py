"""Channel gates: second-order structure scores without weight gradients.

Every group member gets a vector of multiplicative gates ``alpha`` (value 1, so the network is
unchanged) on the channels it owns: a conv/linear layer's output channels (``W[c]``, ``b[c]``), its
input channels (``W[:, i]``), a norm layer's output channels (``gamma_c``, ``beta_c``). Multiplying a
channel of the activation by ``alpha_c`` is the same as multiplying that channel's parameters, so

    dL/d alpha_s            = theta_s^T g                   (first order)
    d^2 L/ d alpha_s d eps  = theta_s^T H v + [shared] theta_s^T g

where ``eps`` is a scalar that scales the parameters in ``v`` (e.g. ``v = theta`` on every conv/linear
layer: scale each such layer's output by ``1 + eps``), and ``[shared]`` is 1 when the member's own
parameters are among those ``eps`` scales (the product ``alpha (1 + eps)`` is bilinear). Both come
from two reverse passes in which *no parameter requires grad*, so autograd never computes the
weight-gradient convolutions; the cost stays a small multiple of one forward+backward, flat in depth.

Members that are not conv/linear/norm layers (attention projections, embeddings, bare parameters)
get their gates on the parameters themselves (``theta' = theta * gate`` along the member's axis),
which costs weight-gradient work for those parameters only.

Gates may be per sample (``(N, C)``) for criteria that need per-sample structure derivatives (SOSP-I).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch.autograd import forward_ad

from ..grouping import IN_AXIS, Member
from ..layers import CONV, LINEAR, NORMS, WEIGHT_LAYERS, is_norm_layer, is_weight_layer
from ..ops.second_order import OVERRIDES as LEAN_SECOND_ORDER
from .context import Batch, Context
from .layout import Layout
from .per_sample import channel_dim, gateable, supports_activation_rows
from .unit_gate import UnitGateSites, channel_view, plus_eps, unit_gate

__all__ = ["GatedModel", "gate_layout", "linear_modules", "second_order_mode"]

def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and linear layers (the ones whose outputs are affine in their own parameters)."""
    return {n: m for n, m in model.named_modules() if is_weight_layer(m)}


def _channels(module: nn.Module, role: str) -> int:
    if isinstance(module, LINEAR):
        return module.out_features if role == "out" else module.in_features
    if isinstance(module, CONV):
        return module.out_channels if role == "out" else module.in_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return module.num_features


def _activation_source(ctx: Context):
    def source(m: Member) -> tuple[str, str, int] | None:
        module = ctx.modules.get(m.module)
        if (module is None or m.module not in ctx.called
                or not supports_activation_rows(m.kind, module, ctx.channel_axes)):
            return None
        role = "in" if m.kind == "in" else "out"
        return (m.module, role, _channels(module, role))
    return source


def gate_layout(ctx: Context) -> Layout:
    """The layout whose sources are the gates: activation gates where possible, parameter gates else."""
    if ctx.gate_layout is None:
        ctx.gate_layout = Layout(ctx.groups, ctx.params, activation=_activation_source(ctx))
    return ctx.gate_layout


def _check_rows(name: str, module: nn.Module, t: torch.Tensor, gate: torch.Tensor | None, per_sample: bool) -> None:
    """Per-sample gates need the samples on the activation's first axis."""
    if per_sample and gate is not None and (t.dim() < 2 or t.shape[0] != gate.shape[0]):
        raise NotImplementedError(
            f"per-sample gates on {name} ({type(module).__name__}): its activation has shape {tuple(t.shape)}, "
            f"not {gate.shape[0]} samples on the first axis (the layer sees samples folded together); pass "
            f"ignored_layers=[{name!r}] to leave its group unscored, or use sosp-h")


def _param_multiplier(gate: torch.Tensor, shape: torch.Size, axis: int, groups: int) -> torch.Tensor:
    """Broadcastable multiplier applying ``gate`` along ``axis`` of a parameter of ``shape``."""
    if len(shape) <= 1:
        return gate
    if axis == IN_AXIS:
        o, ig = shape[0], shape[1]
        og = o // groups
        idx = (torch.arange(o, device=gate.device) // og).unsqueeze(1) * ig + torch.arange(ig, device=gate.device)
        mult = gate[idx]  # (O, I/groups)
        return mult.view(o, ig, *([1] * (len(shape) - 2)))
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return gate.view(view)


class GatedModel:
    """One forward pass of ``ctx.model`` with gates on every member and an optional ``eps`` scaling.

    Args:
        ctx: the scoring context.
        eps_scope: which parameters ``eps`` scales: ``"linear"`` (v = theta on every conv/linear weight
            and bias; OBA's default), ``"all"`` (every parameter; OBA with the full Hessian), ``"members"``
            (the parameters of prunable structures; SOSP), or None (no ``eps``).
        per_sample: batch size for per-sample gates, else None.
        unit_gates: the activation gates are applied by :func:`~pyobc.scoring.unit_gate.unit_gate`
            (value 1; no multiplications by ones in the reverse passes): for passes that differentiate
            once, such as SOSP-H's
            forward-mode path; needs ``per_sample=None``. With an ``eps_scope``, ``eps`` is then a
            forward-mode scalar (tangent 1; call :meth:`run` inside ``forward_ad.dual_level()``): one
            reverse pass gives the gates' gradients as dual tensors whose tangents are ``d^2 L / d
            alpha d eps`` (forward-over-reverse, OBA's fast path).

    After :meth:`run`, ``gates`` are the gate leaves in layout source order and ``eps`` the scalar.

    Example (inside a criterion)::

        gm = GatedModel(ctx, eps_scope="linear")
        loss, logits = gm.run(batch)
        first = torch.autograd.grad(loss, gm.gates)          # theta_s^T g per gate
        member_values = gm.members(first)                     # -> member channels
    """

    def __init__(self, ctx: Context, eps_scope: str | None = None, per_sample: int | None = None,
                 dtype: torch.dtype | None = None, unit_gates: bool = False):
        if unit_gates and per_sample is not None:
            raise ValueError("unit_gates needs per_sample=None")
        self.ctx = ctx
        self.unit_gates = unit_gates
        self._gate_tangents = False  # set by each pass: gates with forward-mode tangents
        self.layout = gate_layout(ctx)
        self.per_sample = per_sample
        self.eps_scope = eps_scope
        dtype = dtype or next(iter(ctx.params.values())).dtype
        self.dtype = dtype
        lead = () if per_sample is None else (per_sample,)
        self.gates: list[torch.Tensor] = [
            torch.ones(lead + (self.layout.source_lengths[k],), dtype=dtype, device=ctx.device, requires_grad=True)
            for k in self.layout.source_keys]
        # eps: a reverse-mode leaf, or (unit gates) the primal of a forward-mode scalar made dual in run()
        self.eps = (torch.zeros((), dtype=dtype, device=ctx.device, requires_grad=not unit_gates)
                    if eps_scope else None)
        self._by_key = dict(zip(self.layout.source_keys, self.gates))
        self._module_eps_map, self._param_eps, shared = self._eps_plan()
        self.shared = shared.to(device=ctx.device, dtype=dtype)

    # -- what eps scales --------------------------------------------------------------------------
    def _eps_params(self) -> set[str]:
        ctx = self.ctx
        if self.eps_scope == "all":
            return set(ctx.params)
        if self.eps_scope == "linear":
            # v = theta on conv/linear weights and biases; also on parameters that are neither norm
            # nor conv/linear (attention projections, embeddings, bare parameters)
            norm_params = {f"{n}.{k}" if n else k for n, m in ctx.modules.items() if is_norm_layer(m)
                           for k, _ in m.named_parameters(recurse=False)}
            return set(ctx.params) - norm_params
        if self.eps_scope == "members":
            return {s.param for g in ctx.groups for m in g.members for s in m.slices}
        return set()

    def _module_eps(self, eps_params: set[str]) -> tuple[dict[str, str], set[str]]:
        """Modules whose output is scaled as a whole ("all") or without bias ("weight"); the
        remaining eps parameters are scaled in parameter space."""
        out: dict[str, str] = {}
        covered: set[str] = set()
        for name, module in self.ctx.modules.items():
            if not isinstance(module, WEIGHT_LAYERS + NORMS) or getattr(module, "transposed", False):
                continue
            if name not in self.ctx.called:  # e.g. attention's out_proj: its weights are read directly
                continue
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                continue
            # its output is not per-channel affine in its own parameters
            if not gateable(module, self.ctx.channel_axes):
                continue
            own = {k: (f"{name}.{k}" if name else k) for k, _ in module.named_parameters(recurse=False)}
            if not own:
                continue
            inside = {k for k, q in own.items() if q in eps_params}
            if inside == set(own):
                out[name] = "all"
            elif isinstance(module, WEIGHT_LAYERS) and inside == {"weight"}:
                out[name] = "weight"
            else:
                continue
            covered |= {own[k] for k in inside}
        return out, eps_params - covered

    def _eps_plan(self) -> tuple[dict[str, str], set[str], torch.Tensor]:
        """``(module_eps, param_eps, shared)`` for this eps scope, computed once per scoring run (every
        pass of a run builds a GatedModel; walking the modules each time cost about 2 ms a pass)."""
        cache = self.ctx.gate_eps
        if self.eps_scope not in cache:
            eps_params = self._eps_params()  # empty without a scope, and so is the rest
            module_eps, param_eps = self._module_eps(eps_params)
            cache[self.eps_scope] = (module_eps, param_eps, self._shared_mask(eps_params))
        return cache[self.eps_scope]

    def _shared_mask(self, eps_params: set[str]) -> torch.Tensor:
        """Per member channel: True where the member's parameters are (all) scaled by eps."""
        mask = torch.zeros(self.layout.num_members, dtype=torch.bool)
        if not eps_params:
            return mask
        for g, offs in zip(self.ctx.groups, self.layout.member_offsets):
            for m, off in zip(g.members, offs):
                if all(s.param in eps_params for s in m.slices):
                    mask[off:off + g.size] = True
        return mask

    # -- the pass -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooks(self, module_eps: Mapping[str, str]) -> Iterator[None]:
        handles = []
        per_sample = self.per_sample is not None
        act_out = {k[1]: g for k, g in self._by_key.items() if k[0] == "act" and k[2] == "out"}
        act_in = {k[1]: g for k, g in self._by_key.items() if k[0] == "act" and k[2] == "in"}
        eps = self.eps
        unit = self.unit_gates

        for name, module in self.ctx.modules.items():
            g_in = act_in.get(name)
            g_out = act_out.get(name)
            how = module_eps.get(name)
            if g_in is None and g_out is None and how is None:
                continue
            d = channel_dim(module, self.ctx.channel_axes)
            if g_in is not None:
                def pre(mod, args, g=g_in, d=d, name=name):
                    x = args[0]
                    _check_rows(name, mod, x, g, per_sample)
                    x = self._unit((name, "in"), x, g, d) if unit else x * channel_view(g, x, d, per_sample)
                    return (x,) + tuple(args[1:])
                handles.append(module.register_forward_pre_hook(pre))
            if g_out is not None or how is not None:
                def post(mod, args, y, g=g_out, d=d, how=how, name=name):
                    # gate and eps combine into one per-channel multiplier, so the activation is
                    # copied once: y' = g * (1 + eps) * y  (minus g * eps * b when eps spares the bias)
                    _check_rows(name, mod, y, g, per_sample)
                    if unit:  # the gate, and eps as a forward-mode tangent
                        if how is None:
                            return self._unit((name, "out"), y, g, d)
                        bias = mod.bias.detach() if how == "weight" and mod.bias is not None else None
                        return self._unit((name, "out"), plus_eps(y, bias, d), g, d, eps=True)
                    scale = None if g is None else channel_view(g, y, d, per_sample)
                    shift = None
                    if how is not None:
                        scale = (1 + eps) if scale is None else scale * (1 + eps)
                        if how == "weight" and mod.bias is not None:
                            shift = channel_view(mod.bias, y, d, False) * eps
                            if g is not None:
                                shift = shift * channel_view(g, y, d, per_sample)
                    y = y * scale
                    return y if shift is None else y - shift
                handles.append(module.register_forward_hook(post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _unit(self, site: tuple[str, str], y: torch.Tensor, gate: torch.Tensor | None, dim: int,
              eps: bool = False) -> torch.Tensor:
        """:func:`unit_gate` at ``site`` (module, "in"/"out"): a view unless the site needs a copy."""
        sites = self.ctx.unit_gate_sites
        copy = self._gate_tangents or sites.copy(site)  # gate tangents make a new tangent, not a view
        return sites.watch(site, unit_gate(y, gate, dim, eps, copy))

    def _params(self, param_eps: set[str]) -> dict[str, torch.Tensor]:
        """Parameter values with parameter-space gates and eps applied (plain tensors otherwise)."""
        theta = dict(self.ctx.theta)
        for key, gate in self._by_key.items():
            if key[0] != "param":
                continue
            _, name, axis = key
            if self.per_sample is not None:
                raise NotImplementedError(
                    f"per-sample gates on parameter {name!r}: only conv/linear/norm members support them")
            t = theta[name]
            theta[name] = t * _param_multiplier(gate, t.shape, axis, self.layout.source_groups[key])
        for name in param_eps:
            theta[name] = theta[name] * (1 + self.eps)
        return theta

    def run(self, batch: Batch, tangents: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list]:
        """Forward the batch; returns the loss and the model's output(s) of that call.

        ``tangents`` (one per gate, gate-shaped; call inside ``torch.autograd.forward_ad.dual_level()``):
        the gates enter the pass as forward-mode dual tensors, so the outputs also carry the directional
        derivative along ``tangents`` (read it with ``forward_ad.unpack_dual``), while reverse mode still
        differentiates with respect to the gate leaves.
        """
        if not self.unit_gates:
            return self._forward(batch, tangents)
        sites = self.ctx.unit_gate_sites
        try:
            result = self._forward(batch, tangents)
        except RuntimeError as exc:
            # a gate site that returned a view was modified in place after all (control flow changed)
            if "is a view and is being modified inplace" not in str(exc) or sites.learning:
                raise
            sites.forget()
            result = self._forward(batch, tangents)
        return result

    def _forward(self, batch: Batch, tangents: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        module_eps, param_eps = self._module_eps_map, self._param_eps
        by_key = self._by_key
        self._gate_tangents = tangents is not None
        if tangents is not None:
            if len(tangents) != len(self.gates):
                raise ValueError(f"{len(tangents)} tangents for {len(self.gates)} gates")
            self._by_key = {k: forward_ad.make_dual(g, t) for (k, g), t in zip(by_key.items(), tangents)}
        eps = self.eps
        if self.unit_gates and eps is not None:
            if forward_ad._current_level < 0:
                raise RuntimeError("unit_gates with an eps_scope: call run() inside forward_ad.dual_level()")
            self.eps = forward_ad.make_dual(eps, torch.ones_like(eps))
        try:
            params = self._params(param_eps)
            outputs: list = []
            sites = self.ctx.unit_gate_sites if self.unit_gates else None
            watch = sites.watching() if sites else contextlib.nullcontext()  # in-place writes, while learning
            with self._hooks(module_eps), second_order_mode(), watch:
                loss = self.ctx.loss(batch, params=params, outputs=outputs)
            if sites:
                sites.learned()
        finally:
            self._by_key = by_key
            self.eps = eps
        return loss, outputs

    def members(self, gate_grads: list[torch.Tensor | None]) -> torch.Tensor:
        """Gate gradients (in gate order; None = zero) gathered into member channels."""
        lead = () if self.per_sample is None else (self.per_sample,)
        flat = torch.cat([g.reshape(lead + (-1,)) if g is not None else torch.zeros_like(t)
                          for g, t in zip(gate_grads, self.gates)], dim=-1)
        return self.layout.members(flat)


def _composite_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    y = centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _composite_hardsigmoid(x, inplace=False):
    # relu6(x + 3) / 6: the same values and first derivative (1/6 strictly inside (-3, 3)), and a second
    # derivative (zero) where PyTorch's fused op has none; ``inplace`` is served out of place
    return torch.nn.functional.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


def _forward_mode_only(fused, composite):
    """``composite`` while forward-mode AD is active (forward-over-reverse passes), else ``fused``."""
    def run(x, inplace=False):
        return composite(x) if forward_ad._current_level >= 0 else fused(x, inplace=inplace)
    return run


#: functions whose fused kernels have a wrong or missing second derivative, and their elementary forms
_COMPOSITES = {
    torch.nn.functional.layer_norm: _composite_layer_norm,
    torch.nn.functional.hardsigmoid: _composite_hardsigmoid,
    # their backward kernels have no forward-mode formula, which forward-over-reverse (OBA) needs;
    # ``inplace`` is served out of place
    torch.nn.functional.silu: _forward_mode_only(torch.nn.functional.silu, lambda x: x * torch.sigmoid(x)),
    torch.nn.functional.mish: _forward_mode_only(
        torch.nn.functional.mish, lambda x: x * torch.tanh(torch.nn.functional.softplus(x))),
    **LEAN_SECOND_ORDER,  # convolution and eval-mode batch norm without wasted double-backward work
}


class _ExactSecondOrder(torch.overrides.TorchFunctionMode):
    """Routes ``F.layer_norm`` and ``F.hardsigmoid`` (and, under forward-mode AD, ``F.silu`` and
    ``F.mish``) through elementary ops whose derivatives autograd composes exactly.

    PyTorch's fused LayerNorm backward has a wrong derivative of its weight gradient with respect to
    the input (the Hessian it implies is not symmetric; compare pytorch/pytorch#196700 and #175754 for
    the same family of defects). pyobc's tests check against finite differences. ``hardsigmoid_backward``
    has no derivative at all (MobileNetV3's squeeze-excitation uses it).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        composite = _COMPOSITES.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def second_order_mode() -> Iterator[None]:
    """Context for passes that differentiate twice: exact LayerNorm, a hardsigmoid with a second
    derivative, and the math attention backend (the fused SDPA kernels have no double backward on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), _ExactSecondOrder():
        yield
