"""Forward-mode AD through pyobc's lean convolution / eval batch norm, and SOSP-H's unit gates.

References are torch's own ops differentiated by ``torch.func.jvp`` / ``torch.autograd`` in float64 (never
pyobc's replacements), plus a count of the convolutions that run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from pyobc.ops import second_order as lean
from pyobc.scoring.unit_gate import unit_gate

CONVS = [  # (func, in_shape, weight_shape, stride, padding, dilation, groups)
    (F.conv1d, (2, 4, 11), (6, 2, 3), 2, 1, 1, 2),
    (F.conv2d, (2, 3, 9, 8), (4, 3, 3, 3), 2, 1, 1, 1),
    (F.conv2d, (2, 4, 10, 7), (4, 1, 3, 3), 1, 2, 2, 4),  # depthwise, dilated
    (F.conv3d, (1, 2, 5, 6, 5), (3, 2, 2, 3, 2), (1, 2, 2), (0, 1, 1), 1, 1),
]


def _dual_pass(fn, x, t):
    """(primal, tangent, reverse gradient of <r, primal> w.r.t. x) of ``fn`` at ``x`` along ``t``."""
    x = x.detach().requires_grad_()
    with forward_ad.dual_level():
        out = fn(forward_ad.make_dual(x, t))
        primal, tangent = forward_ad.unpack_dual(out)
    r = torch.linspace(-1, 1, primal.numel(), dtype=primal.dtype).view_as(primal)
    (gx,) = torch.autograd.grad((primal * r).sum(), x)
    return primal.detach(), tangent, gx


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c[0].__name__}-{c[1]}-g{c[6]}")
def test_conv_jvp_matches_torch_and_runs_one_tangent_convolution(case):
    func, in_shape, w_shape, *args = case
    g = torch.Generator().manual_seed(0)
    x, t = (torch.randn(in_shape, dtype=torch.float64, generator=g) for _ in range(2))
    w = torch.randn(w_shape, dtype=torch.float64, generator=g)
    b = torch.randn(w_shape[0], dtype=torch.float64, generator=g)
    want_p, want_t = torch.func.jvp(lambda v: func(v, w, b, *args), (x,), (t,))
    got_p, got_t, gx = _dual_pass(lambda v: lean.conv_input_only(func, v, w, b, *args), x, t)
    with forward_ad.dual_level(), torch.profiler.profile() as prof:  # the forward (JVP) part alone
        lean.conv_input_only(func, forward_ad.make_dual(x.detach().requires_grad_(), t), w, b, *args)
    torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)
    r = torch.linspace(-1, 1, want_p.numel(), dtype=torch.float64).view_as(want_p)
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(gx, torch.autograd.grad((func(xr, w, b, *args) * r).sum(), xr)[0])
    # primal + tangent, not torch's extra convolution of the input with a zero weight tangent
    assert sum(e.name == "aten::_convolution" for e in prof.events()) == 2


@pytest.mark.parametrize("case,channels_last",
                         [(c, False) for c in CONVS] + [(c, True) for c in CONVS if len(c[1]) == 4],
                         ids=lambda v: f"{v[0].__name__}-{v[1]}-g{v[6]}" if isinstance(v, tuple) else f"cl{v}")
def test_conv_backward_on_dual_gradients_matches_torch(case, channels_last):
    """Forward-over-reverse: the lean backward maps value and tangent of a dual gradient alike, also
    for a channels-last input."""
    func, in_shape, w_shape, *args = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(in_shape, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(w_shape, dtype=torch.float64, generator=g)
    y = func(x, w, None, *args)
    r, r_t = (torch.randn(y.shape, dtype=torch.float64, generator=g) for _ in range(2))
    xr = x.detach().requires_grad_()
    with forward_ad.dual_level():
        out = lean.conv_input_only(func, xr, w, None, *args)
        (gx,) = torch.autograd.grad(out, xr, grad_outputs=forward_ad.make_dual(r, r_t))
        got, got_t = forward_ad.unpack_dual(gx)
    want, want_t = (torch.autograd.grad(func(xr, w, None, *args), xr, grad_outputs=c)[0] for c in (r, r_t))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)


def test_conv_jvp_keeps_torchs_formula_when_the_weight_has_a_tangent():
    x, w, tw = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    with forward_ad.dual_level():
        out = lean.conv_input_only(F.conv2d, x, forward_ad.make_dual(w, tw), None, 1, 1)
        tangent = forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, F.conv2d(x, tw, None, 1, 1))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_batch_norm_eval_jvp_matches_torch(shape):
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    x, t = (torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(2))
    mean, var = torch.randn(c, dtype=torch.float64, generator=g), torch.rand(c, dtype=torch.float64, generator=g) + 0.1
    w, b = torch.randn(c, dtype=torch.float64, generator=g), torch.randn(c, dtype=torch.float64, generator=g)
    want_p, want_t = torch.func.jvp(lambda v: F.batch_norm(v, mean, var, w, b, False, 0.1, 1e-3), (x,), (t,))
    got_p, got_t, gx = _dual_pass(lambda v: lean.batch_norm_eval(v, mean, var, w, b, False, 0.1, 1e-3), x, t)
    torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)
    r = torch.linspace(-1, 1, want_p.numel(), dtype=torch.float64).view_as(want_p)
    torch.testing.assert_close(gx, (r * (w / torch.sqrt(var + 1e-3)).view([1, -1] + [1] * (len(shape) - 2))))


@pytest.mark.parametrize("dim", [1, -1])
def test_unit_gate_is_a_product_with_ones(dim):
    """Forward value, tangent (input and gate tangents) and reverse gradients of ``y * gate`` at gate = 1,
    including an in-place op on the result."""
    g = torch.Generator().manual_seed(2)
    y, ty, r = (torch.randn(3, 4, 5, dtype=torch.float64, generator=g) for _ in range(3))
    c = y.shape[dim]
    tg = torch.randn(c, dtype=torch.float64, generator=g)
    shape = [1, 1, 1]
    shape[dim] = c

    def plain(v, gate):
        return (v * gate.view(shape)).relu_()

    ones = torch.ones(c, dtype=torch.float64)
    want_p, want_t = torch.func.jvp(plain, (y, ones), (ty, tg))
    yr, gr = y.clone().requires_grad_(), ones.clone().requires_grad_()
    want_gy, want_gg = torch.autograd.grad((plain(yr, gr) * r).sum(), (yr, gr))

    yl, gl = y.clone().requires_grad_(), ones.clone().requires_grad_()
    with forward_ad.dual_level():
        out = unit_gate(forward_ad.make_dual(yl, ty), forward_ad.make_dual(gl, tg), dim).relu_()
        got_p, got_t = forward_ad.unpack_dual(out)
    got_gy, got_gg = torch.autograd.grad((got_p * r).sum(), (yl, gl))
    for got, want in ((got_p, want_p), (got_t, want_t), (got_gy, want_gy), (got_gg, want_gg)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _relu_forward_over_reverse(relu, x, t, g, g_t):
    """(y, y_t, dL/dx, its tangent) of ``relu`` at x along t, the reverse pass run on the dual gradient
    (g, g_t) — what OBA's forward-over-reverse does at every ReLU — and the profiler events of that pass."""
    x = x.detach().requires_grad_()
    with forward_ad.dual_level():
        y = relu(forward_ad.make_dual(x, t))
        with torch.profiler.profile() as prof:
            (gx,) = torch.autograd.grad(y, x, forward_ad.make_dual(g, g_t))
        y_p, y_t = forward_ad.unpack_dual(y)
        gx_p, gx_t = forward_ad.unpack_dual(gx)
    return [y_p.detach(), y_t, gx_p, gx_t], prof.events()


def test_relu_on_dual_matches_torch_without_zero_tangents():
    g = torch.Generator().manual_seed(0)
    x, t, gr, gr_t = (torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g) for _ in range(4))
    got, events = _relu_forward_over_reverse(lean.relu_on_dual, x, t, gr, gr_t)
    want, _ = _relu_forward_over_reverse(F.relu, x, t, gr, gr_t)
    mask = (x > 0).double()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[3], gr_t * mask, rtol=0, atol=0)  # and by hand
    # no activation-sized zero tangent (torch's threshold_backward formula adds one per ReLU and pass)
    assert not [e for e in events if e.name in ("aten::zeros_like", "aten::fill_", "aten::zero_")]


def test_relu_on_dual_keeps_torch_in_place_and_outside_forward_mode():
    x = torch.randn(4, requires_grad=True)
    assert lean.relu_on_dual(x).grad_fn.name() == "ReluBackward0"  # no forward-mode AD: torch's relu
    y = x.detach().clone()
    assert lean.relu_on_dual(y, inplace=True) is y and bool((y >= 0).all())


def test_relu_on_dual_serves_in_place_out_of_place_in_forward_mode():
    """torchvision's ``ReLU(inplace=True)`` inside OBA's pass: same values and tangent as torch's relu, the
    input left as it was (models use the returned tensor)."""
    g = torch.Generator().manual_seed(1)
    x, t, gr, gr_t = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(4))
    got, events = _relu_forward_over_reverse(lambda v: lean.relu_on_dual(v, inplace=True), x, t, gr, gr_t)
    want, _ = _relu_forward_over_reverse(F.relu, x, t, gr, gr_t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not [e for e in events if e.name in ("aten::zeros_like", "aten::fill_", "aten::zero_")]
    v = x.clone().requires_grad_()
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(v, t)
        out = lean.relu_on_dual(dual, inplace=True)
        assert out is not dual and torch.equal(forward_ad.unpack_dual(dual).primal, x)


class _InPlaceRelu(torch.nn.Module):
    """conv -> BN -> ReLU(inplace) -> conv -> head, as torchvision writes its blocks."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.conv1, self.bn = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.relu = torch.nn.ReLU(inplace=inplace)
        self.conv2, self.head = torch.nn.Conv2d(6, 5, 3), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.conv2(self.relu(self.bn(self.conv1(x)))).mean((2, 3)))


def test_oba_with_in_place_relu_copies_no_activation_after_learning():
    """The BN gate before ``ReLU(inplace=True)`` needs no copy once the ReLU is served out of place, and the
    scores are those of the same network written with ``inplace=False``."""
    import pyobc
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    ref = _InPlaceRelu(False).double().eval()
    with torch.no_grad():
        ref.bn.running_mean.normal_()
        ref.bn.running_var.uniform_(0.5, 2.0)
    model = _InPlaceRelu(True).double().eval()
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

    clones: list[int] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.clone.default and args[0].dim() == 4:
                clones[-1] += 1
            return func(*args, **(kwargs or {}))

    def batches():
        for _ in range(3):
            clones.append(0)
            with Count():
                yield x, y

    got = pyobc.score(model, batches(), "oba", micro_batch=None)
    want = pyobc.score(ref, [(x, y)] * 3, "oba", micro_batch=None)
    for a, b in zip(got.values, want.values):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert clones[1:] == [0, 0]  # batches after the learning pass copy no activation
