"""Lean replacements of convolution and eval-mode batch norm for passes that differentiate twice.

pyobc's second-order criteria (OBA, SOSP's double-VJP path) run two reverse passes in which no
parameter requires grad. Two of PyTorch's own derivative formulas then compute work nobody asked for:

* **Convolution.** The first backward's input gradient is a ``ConvolutionBackward0`` node; its
  derivative (``_convolution_double_backward``) computes, besides ``ggO = conv(ggI, W)``, the weight
  term ``conv(ggI, gO)`` whether or not the weight requires grad: one full convolution per layer
  thrown away (measured: 3 convolutions per layer in the second pass instead of 2).
  :func:`conv_input_only` is the same convolution whose backward is written with
  ``conv_transpose`` (a first-order op): its derivative is one ``convolution_backward`` restricted
  to the inputs that require grad.
* **Batch norm in eval mode** is the affine map ``x * s + t`` with ``s = gamma / sqrt(var + eps)``
  and ``t = beta - mean * s``. The fused kernel's double backward (``NativeBatchNormBackwardBackward0``)
  recomputes the training-mode formulas; :func:`batch_norm_eval` is the affine map itself (one
  ``addcmul``), whose derivatives of every order are elementwise.

* **Forward-mode AD** (SOSP-H's ``J theta_M``) with constant weights: torch's convolution JVP is
  ``conv(x_t, W) + conv(x, W_t)`` and materialises a zero ``W_t`` when the weight has no tangent, one
  wasted convolution (plus a zero-filled weight and an activation-sized add) per layer; the affine batch
  norm's JVP goes through a decomposition with zero tangents of its per-channel terms. Here the tangent
  is ``conv(x_t, W)`` (``x_t * s``), the primal the plain op (:func:`_with_tangent`).
* **Forward-over-reverse** (OBA's default on conv/BN nets): a reverse pass runs on dual gradients after
  such a forward. Where the input requires grad, the convolution and the affine map are autograd
  Functions (``_ConvInputOnly``, ``_AffineInputOnly``) whose backward maps value and tangent of the
  gradient through the same transposed convolution (multiply by ``s``): torch's forward-mode formula of
  ``convolution_backward`` would also convolve a zero weight tangent. ReLU (:func:`relu_on_dual`) is such
  a Function too: torch's forward-mode formula of its backward adds an activation-sized zero tensor.

Both are exact: the same functions, other derivative graphs. :data:`OVERRIDES` maps the torch
functions to these replacements; :func:`pyobc.scoring.gates.second_order_mode` applies them.
They fall back to the torch function where their shortcut does not apply (weights that require
grad or carry a tangent, string padding, training-mode batch norm, functorch transforms active).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _forward_ad

from ._registry import has_tangent

__all__ = ["conv_input_only", "batch_norm_eval", "relu_on_dual", "served_out_of_place", "OVERRIDES",
           "unpack_dual", "make_dual"]


def unpack_dual(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(primal, tangent)`` of ``t`` at the current forward-AD level (``(t, None)`` outside one), as
    ``torch.autograd.forward_ad.unpack_dual`` gives them, by torch's C function directly: the public
    wrapper imports a module and looks for an export-tracing mode on every call (2.9 against 0.9 us; with
    :func:`make_dual`, 4.8 against 1.8 us, an OBA-full pass of ResNet-56 at micro-batch 16 took 221 ->
    210 ms, alternating in one process).

    Example:
        >>> from torch.autograd import forward_ad
        >>> with forward_ad.dual_level():
        ...     p, t = unpack_dual(make_dual(torch.ones(2), torch.full((2,), 3.0)))
        >>> t.tolist()
        [3.0, 3.0]
    """
    level = _forward_ad._current_level
    if level < 0:
        return t, None
    return torch._unpack_dual(t, level)


def make_dual(t: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``torch.autograd.forward_ad.make_dual(t, tangent)`` at the current level without the public
    wrapper's per-call checks and imports (pyobc's own calls pass floating-point tensors of one shape,
    inside a level whose jvp decompositions the wrapper loaded when the pass made its first dual)."""
    return torch._make_dual(t, tangent, level=_forward_ad._current_level)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _input_grad(grad, weight, in_shape, stride, padding, dilation, groups):
    """``d conv / d x`` applied to ``grad``: a transposed convolution, sized back to ``in_shape``."""
    nd = weight.dim() - 2
    st, pd, dl = _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd)
    out_pad = tuple(in_shape[2 + i] - ((grad.shape[2 + i] - 1) * st[i] - 2 * pd[i]
                                       + dl[i] * (weight.shape[2 + i] - 1) + 1) for i in range(nd))
    return _CONV_T[nd](grad, weight, None, st, pd, out_pad, groups, dl)


class _ConvInputOnly(torch.autograd.Function):
    """A convolution differentiable in its input only (weight and bias are constants)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        # ctx-first form: Function.apply binds the arguments through inspect.signature for the other
        # form, on every call (tens of microseconds, many calls per pass)
        ctx.save_for_backward(weight)
        ctx.save_for_forward(weight)
        ctx.args = (x.shape, stride, padding, dilation, groups)
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        # forward-over-reverse (dual grad): torch's own forward-mode formula of convolution_backward
        # would also convolve a zero weight tangent
        grad_x = _linear_on_dual(lambda t: _input_grad(t, weight, *ctx.args), grad)
        return grad_x, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        (weight,) = ctx.saved_tensors
        _, stride, padding, dilation, groups = ctx.args
        # tangents are values, never differentiated in reverse: detached, so that this convolution
        # does not record a graph (torch's forward-mode formulas may leave a tangent requiring grad)
        return _CONV[weight.dim() - 2](x_t.detach(), weight, None, stride, padding, dilation, groups)


def _constant(t: torch.Tensor | None) -> bool:
    return t is None or not t.requires_grad


def _linear_on_dual(fn: Callable, grad: torch.Tensor) -> torch.Tensor:
    """``fn(grad)`` for a map ``fn`` linear in its argument (with constant coefficients), on a gradient
    that may be dual (forward-over-reverse): the tangent of the result is ``fn`` of grad's tangent."""
    g, g_t = unpack_dual(grad)
    out = fn(g)
    return out if g_t is None else make_dual(out, fn(g_t))


def _with_tangent(primal_fn: Callable, tangent_fn: Callable, input: torch.Tensor) -> torch.Tensor:
    """A map that is linear in ``input`` up to a constant (``primal_fn``, whose derivative along the
    input's forward-mode tangent is ``tangent_fn(tangent)``), evaluated under forward-mode AD: the
    primal is ``primal_fn`` of the input's primal (reverse mode still reaches ``input`` through it), the
    output's tangent ``tangent_fn`` of the input's tangent."""
    primal, tangent = unpack_dual(input)
    out = primal_fn(primal)
    return out if tangent is None else make_dual(out, tangent_fn(tangent.detach()))


def conv_input_only(func: Callable, input: torch.Tensor, weight: torch.Tensor, bias=None, stride=1,
                    padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``func(input, weight, bias, ...)`` (``F.conv1d/2d/3d``) with a lean double backward.

    When ``weight`` and ``bias`` do not require grad (and no forward-mode AD or functorch transform is
    active), the result's backward is a transposed convolution, so differentiating it again costs one
    convolution instead of two. Otherwise ``func`` itself is called.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        >>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        >>> y = conv_input_only(F.conv2d, x, w, None, 2, 1)
        >>> torch.allclose(y, F.conv2d(x, w, None, 2, 1))
        True
        >>> torch.autograd.gradgradcheck(lambda t: conv_input_only(F.conv2d, t, w, None, 2, 1), (x,))
        True
    """
    if (not _constant(weight) or not _constant(bias) or isinstance(padding, str)
            or torch._C._are_functorch_transforms_active() or weight.dim() - 2 not in _CONV):
        return func(input, weight, bias, stride, padding, dilation, groups)
    if _forward_ad._current_level >= 0:  # JVP: one convolution of the input's tangent, none of W_t = 0
        if has_tangent((weight, bias)):
            return func(input, weight, bias, stride, padding, dilation, groups)
        if input.requires_grad:  # forward-over-reverse: a reverse pass on dual gradients follows
            return _ConvInputOnly.apply(input, weight, bias, stride, padding, dilation, groups)
        return _with_tangent(lambda x: func(x, weight, bias, stride, padding, dilation, groups),
                             lambda t: func(t, weight, None, stride, padding, dilation, groups), input)
    if not input.requires_grad:
        return func(input, weight, bias, stride, padding, dilation, groups)
    return _ConvInputOnly.apply(input, weight, bias, stride, padding, dilation, groups)


def batch_norm_eval(input: torch.Tensor, running_mean, running_var, weight=None, bias=None,
                    training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm`` in eval mode as the affine map ``x * s + t`` (one ``addcmul``).

    ``s = weight / sqrt(running_var + eps)``, ``t = bias - running_mean * s``: the same function as
    ``F.batch_norm(..., training=False)``, with elementwise derivatives of every order (gradients
    flow to ``x``, ``weight`` and ``bias``). Training mode, or missing running statistics, call
    ``F.batch_norm`` itself.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, m, v = torch.randn(4, 3, 5, 5), torch.randn(3), torch.rand(3) + 0.5
        >>> w, b = torch.randn(3), torch.randn(3)
        >>> torch.allclose(batch_norm_eval(x, m, v, w, b), F.batch_norm(x, m, v, w, b), atol=1e-6)
        True
    """
    if training or running_mean is None or running_var is None or input.dim() < 2:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = [1, -1] + [1] * (input.dim() - 2)
    scale, shift = scale.view(shape), shift.view(shape)
    # under forward mode with constant s and t: tangent x_t * s, no zero terms (and, for forward-over-
    # reverse, a backward that multiplies the dual gradient by s, without torch's decomposed formulas)
    if _forward_ad._current_level >= 0 and not has_tangent((scale, shift)) and _constant(scale) and _constant(shift):
        if input.requires_grad:
            return _AffineInputOnly.apply(input, scale, shift)
        return _with_tangent(lambda x: torch.addcmul(shift, x, scale), lambda t: t * scale, input)
    return torch.addcmul(shift, input, scale)


class _AffineInputOnly(torch.autograd.Function):
    """``x * scale + shift`` with constant ``scale``, ``shift``, differentiable in ``x`` in both modes; the
    backward also runs on dual gradients (forward-over-reverse): ``grad * scale`` for value and tangent."""

    @staticmethod
    def forward(ctx, x, scale, shift):  # ctx-first: no per-call signature binding in Function.apply
        ctx.save_for_backward(scale)
        ctx.save_for_forward(scale)
        return torch.addcmul(shift, x, scale)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return _linear_on_dual(lambda t: t * scale, grad), None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        (scale,) = ctx.saved_tensors
        return x_t.detach() * scale


class _ReluOnDual(torch.autograd.Function):
    """``relu(x)`` for forward-over-reverse passes: tangent ``x_t * [y > 0]`` and, on dual gradients,
    ``g * [y > 0]`` for value and tangent. PyTorch's forward-mode formula of ``threshold_backward`` adds
    an activation-sized ``zeros_like`` for the (zero) derivative of the mask, one per ReLU and pass."""

    @staticmethod
    def forward(ctx, x):  # ctx-first: no per-call signature binding in Function.apply
        y = torch.relu(x)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        mask_of = unpack_dual(y)[0]
        return _linear_on_dual(lambda t: torch.ops.aten.threshold_backward(t, mask_of, 0), grad)

    @staticmethod
    def jvp(ctx, x_t):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(x_t.detach(), y, 0)


def relu_on_dual(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu`` with lean derivatives under forward-mode AD when ``input`` requires grad (a reverse pass
    on dual gradients follows; ``inplace=True`` is then served out of place, as the other replacements of
    second-order passes do: models use the returned tensor); ``F.relu`` itself otherwise and under functorch
    transforms.

    Example:
        >>> import torch
        >>> from torch.autograd import forward_ad
        >>> x, t = torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64)
        >>> with forward_ad.dual_level():
        ...     y = relu_on_dual(forward_ad.make_dual(x, t))
        ...     torch.equal(forward_ad.unpack_dual(y).tangent, t * (x > 0))
        True
    """
    if not _lean_relu_applies(input):
        return F.relu(input, inplace=inplace)
    return _ReluOnDual.apply(input)


def _lean_relu_applies(input: torch.Tensor) -> bool:
    return (_forward_ad._current_level >= 0 and input.requires_grad
            and not torch._C._are_functorch_transforms_active())


def served_out_of_place(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a second-order pass serves this in-place call out of place (``F.relu(x, inplace=True)``
    through :func:`relu_on_dual`): the input is not modified, so a gate site before it needs no copy."""
    if func is not F.relu or not args or not isinstance(args[0], torch.Tensor):
        return False
    inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
    return bool(inplace) and _lean_relu_applies(args[0])


def _conv_override(func: Callable) -> Callable:
    def run(*args, **kwargs):
        return conv_input_only(func, *args, **kwargs)
    return run


#: torch function -> replacement with the same signature, for passes that differentiate twice
OVERRIDES: dict[Callable, Callable] = {
    **{func: _conv_override(func) for func in _CONV.values()},
    F.batch_norm: batch_norm_eval,
    F.relu: relu_on_dual,
    torch.relu: relu_on_dual,
    torch.Tensor.relu: relu_on_dual,
}
