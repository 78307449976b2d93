"""Gates of value 1 without multiplications by ones, for passes that differentiate once.

:func:`unit_gate` is ``y * gate`` along a channel dim for a gate whose value is 1 (the gated model equals
the model): the forward returns ``y`` (a view, or a copy where a later in-place op modifies the result),
the input gradient is the incoming gradient, the gate gradient one fused per-channel dot product
(:func:`pyobc.ops.channel_dot`), and the forward-mode tangent ``y_t + y * gate_t``.

Forward-over-reverse (OBA): a layer's output scaled by ``1 + eps`` for a forward-mode ``eps`` at 0 with
tangent 1 is :func:`plus_eps` (the tangent ``y_t + y - bias``, no multiply by one) followed by
``unit_gate(..., eps=True)``, whose backward, run on dual gradients, also differentiates the reverse pass
along eps: the input gradient ``(1 + eps) grad`` has the tangent ``grad_t + grad``, and the gate gradient
``sum grad * y`` the tangent ``sum grad_t * y + grad * y_t``.

Not differentiable twice (the backward ignores the gate's value).
"""
from __future__ import annotations

import contextlib

import torch

from .. import ops
from ..ops.second_order import make_dual, served_out_of_place, unpack_dual

__all__ = ["unit_gate", "plus_eps", "dual_channel_dot", "UnitGateSites"]


def channel_view(vec: torch.Tensor, like: torch.Tensor, dim: int, per_sample: bool = False) -> torch.Tensor:
    """Reshape gates ``(C,)`` or (``per_sample``) ``(N, C)`` to broadcast against ``like`` along ``dim``."""
    shape = [1] * like.dim()
    shape[dim % like.dim()] = vec.shape[-1]
    if per_sample:
        shape[0] = vec.shape[0]
    return vec.view(shape)


def dual_channel_dot(grad: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """``channel_dot(grad, y)``; for dual ``grad`` / ``y`` (forward-over-reverse) with its tangent
    ``channel_dot(grad_t, y) + channel_dot(grad, y_t)`` (the fused op has no forward-mode formula)."""
    g, g_t = unpack_dual(grad)
    v, v_t = unpack_dual(y)
    out = ops.channel_dot(g, v, dim)
    if g_t is None and v_t is None:
        return out
    tangent = ops.channel_dot(g_t, v, dim) if g_t is not None else torch.zeros_like(out)
    if v_t is not None:
        tangent = tangent + ops.channel_dot(g, v_t, dim)
    return make_dual(out, tangent)


def plus_eps(y: torch.Tensor, bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``y (1 + eps) - eps * bias`` at ``eps = 0`` for a forward-mode ``eps`` with tangent 1, as far as
    the forward pass goes: ``y`` itself with the tangent ``y_t + y - bias``. The reverse pass's
    ``(1 + eps)`` is :func:`unit_gate`'s (``eps=True``), which must follow."""
    primal, tangent = unpack_dual(y)
    shift = primal.detach() if bias is None else primal.detach() - channel_view(bias, primal, dim)
    return make_dual(primal, shift if tangent is None else tangent.detach() + shift)


class _UnitGate(torch.autograd.Function):
    # the ctx-first form: Function.apply binds arguments through inspect.signature for the other form,
    # tens of microseconds on every one of the many calls of a pass

    @staticmethod
    def forward(ctx, y, gate, dim, eps, copy):
        ctx.dim, ctx.eps, ctx.copy = dim, eps, copy
        ctx.gate_dtype = None if gate is None else gate.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        # a view costs nothing; a later in-place op on it is an error (never a wrong result), which is why
        # sites that are modified in place get a copy (UnitGateSites)
        return y.clone() if copy else y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None
        (y,) = ctx.saved_tensors
        gate_grad = dual_channel_dot(grad, y, ctx.dim) if ctx.needs_input_grad[1] else None
        if ctx.eps:
            g, g_t = unpack_dual(grad)
            grad = make_dual(g, g if g_t is None else g_t + g)
        return grad, None if gate_grad is None else gate_grad.to(ctx.gate_dtype), None, None, None

    @staticmethod
    def jvp(ctx, y_t, gate_t, *_):
        (y,) = ctx.saved_tensors
        if gate_t is None:
            if y_t is None:
                return None
            return y_t.detach().clone() if ctx.copy else y_t.view_as(y_t)
        gate_t = channel_view(gate_t, y, ctx.dim)
        return y * gate_t if y_t is None else torch.addcmul(y_t, y, gate_t)


def unit_gate(y: torch.Tensor, gate: torch.Tensor | None, dim: int, eps: bool = False,
              copy: bool = True) -> torch.Tensor:
    """``y * gate`` along ``dim`` for ``gate == 1`` (see the module docstring); ``gate`` may be None
    (``eps`` alone). ``copy=False`` returns a view (no gate tangents then).

    Example:
        >>> import torch
        >>> y, gate = torch.randn(2, 3, 4), torch.ones(3, requires_grad=True)
        >>> out = unit_gate(y, gate, 1)
        >>> torch.equal(out, y)
        True
        >>> torch.allclose(torch.autograd.grad(out.sum(), gate)[0], y.sum((0, 2)))
        True
    """
    return _UnitGate.apply(y, gate, dim, eps, copy)


#: Python's in-place operators (``x += y`` reaches ``__torch_function__`` as these)
_IN_PLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                                              "or", "xor", "lshift", "rshift", "matmul")}


def _in_place_target(func, args, kwargs) -> object:
    """The tensor an in-place call writes to (``relu_``, ``F.relu(..., inplace=True)``, ``x += y``, ``out=``),
    else None."""
    name = getattr(func, "__name__", "")
    if kwargs.get("out") is not None:
        return kwargs["out"]
    if kwargs.get("inplace") or (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS:
        return args[0] if args else None
    return None


class _InPlaceWatch(torch.overrides.TorchFunctionMode):
    def __init__(self, sites: "UnitGateSites"):
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _in_place_target(func, args, kwargs)
        if target is not None and not served_out_of_place(func, args, kwargs):
            self.sites.note_in_place(target)
        return func(*args, **kwargs)


class UnitGateSites:
    """Which gate sites need a copy, kept on the scoring context. Learned on the first gated pass of a
    scoring run: every site copies, and a torch-function mode notes the gate outputs that an in-place op
    then writes to (e.g. a norm's output fed to ``ReLU(inplace=True)``); later passes return views at the
    other sites. If a view is modified in place after all (the model's control flow changed, or an
    in-place op wrote to a view of the output), :meth:`forget` makes every site copy from then on.

    Only object ids are kept while learning, never the outputs themselves (that would hold every gated
    activation of the pass at once); an id reused by a later tensor can only add a site, i.e. a copy.
    """

    def __init__(self) -> None:
        self.modified: set[tuple[str, str]] | None = None  # None: not learned yet
        self.copy_all = False
        self._ids: dict[int, tuple[str, str]] = {}
        self._found: set[tuple[str, str]] = set()

    @property
    def learning(self) -> bool:
        return self.modified is None

    def copy(self, site: tuple[str, str]) -> bool:
        return self.modified is None or self.copy_all or site in self.modified

    def watch(self, site: tuple[str, str], out: torch.Tensor) -> torch.Tensor:
        if self.modified is None:
            self._ids[id(out)] = site
        return out

    def note_in_place(self, tensor: object) -> None:
        site = self._ids.get(id(tensor))
        if site is not None:
            self._found.add(site)

    def watching(self):
        """Context for a pass: the in-place watch while learning, nothing after."""
        return _InPlaceWatch(self) if self.modified is None else contextlib.nullcontext()

    def learned(self) -> None:
        """After a pass: remember the sites that in-place ops wrote to."""
        if self.modified is None:
            self.modified = set(self._found)
        self._ids, self._found = {}, set()

    def forget(self) -> None:
        """A view was modified in place after all: copy at every site from now on."""
        self.modified, self.copy_all = set(), True
        self._ids, self._found = {}, set()
