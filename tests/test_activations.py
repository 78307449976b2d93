"""Second-order passes through activations whose fused kernels lack a double backward (issue #12, item 8).

OBA with the full Hessian per weight (theta * H theta) is compared with central finite differences of exact
first derivatives — no second derivative from autograd in the reference — on tiny float64 nets with
hardswish, hardsigmoid (no ``hardsigmoid_backward`` derivative in PyTorch), silu, gelu, mish, elu and
softplus; and an op that still has no double backward must fail with one error naming the method, the op
and the module.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import pyobc

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

ACTIVATIONS = {
    "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "hardsigmoid_inplace": nn.Hardsigmoid(inplace=True),
    "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "mish": nn.Mish(),
    "elu": nn.ELU(), "softplus": nn.Softplus(),
}


class SE(nn.Module):
    """Conv -> act -> squeeze-excitation gate with the activation (MobileNetV3's block shape) -> head."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = act
        self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.conv(x) * 2.0)  # scaled so that hard* kinks (±3) are crossed
        s = self.act(self.fc2(F.relu(self.fc1(h.mean((2, 3))))) * 3.0)
        return self.head((h * s[:, :, None, None]).mean((2, 3)))


def _make(act: nn.Module):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = SE(act).eval()
    return model, torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 3, (5,), generator=g)


def _finite_difference_s_full(model, x, y, h=1e-6):
    """theta * (H theta) per parameter from central differences of exact gradients along theta."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def grad_at(scale):
        p = {k: (v * scale).requires_grad_(True) for k, v in theta.items()}
        loss = F.cross_entropy(functional_call(model, p, (x,)), y)
        return dict(zip(names, torch.autograd.grad(loss, [p[n] for n in names])))

    plus, minus = grad_at(1 + h), grad_at(1 - h)
    return {k: theta[k] * (plus[k] - minus[k]) / (2 * h) for k in names}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_oba_full_hessian_matches_finite_differences(name):
    model, x, y = _make(ACTIVATIONS[name])
    expected = _finite_difference_s_full(model, x, y)
    got = pyobc.score(model, [(x, y)], "oba", granularity="weight", hessian="full").by_parameter()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-5, atol=1e-9, msg=k)


@pytest.mark.parametrize("name", ["hardswish", "hardsigmoid", "silu", "mish"])
@pytest.mark.parametrize("method", ["oba", "sosp-h", "sosp-i"])
def test_channel_path_equals_weight_path_and_runs(name, method):
    """The gated channel pass (no weight gradients) agrees with the per-weight double backward."""
    model, x, y = _make(ACTIVATIONS[name])
    scores = pyobc.score(model, [(x, y)], method)
    assert all(torch.isfinite(v).all() for v in scores.values)
    if method == "oba":
        a = pyobc.score(model, [(x, y)], "oba", hessian="full", normalize="none", group_reduction="sum").by_module()
        b = pyobc.score(model, [(x, y)], "oba", hessian="full", normalize="none", group_reduction="sum",
                        granularity="weight").by_module()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-12)


class Prototypes(nn.Module):
    """Distances to learned prototypes through torch.cdist (no double backward in PyTorch)."""

    def __init__(self):
        super().__init__()
        self.protos = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return -torch.cdist(x, self.protos)


def test_op_without_double_backward_is_one_named_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6), Prototypes()).eval()
    data = [(torch.randn(4, 3), torch.randint(0, 4, (4,)))]
    with pytest.raises(NotImplementedError, match=r"method 'oba' .*aten::_cdist_backward.*3 \(Prototypes\)"):
        pyobc.score(model, data, "oba")
    assert pyobc.score(model, data, "jacobian").values  # first order works
