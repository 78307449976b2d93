"""SOSP-H and SOSP-I against dense Gauss-Newton matrices from torch.func on tiny float64 nets.

The structure vectors theta_s are written out by hand from each net's layout (which weights go with which
channel), J comes from ``torch.func.jacrev`` of the logits and Lambda from the softmax cross-entropy in
closed form — never from pyobc's gates, grouping or layout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev

import pyobc
from pyobc.criteria.sosp import SOSPMemoryError
from test_criteria import Tiny, member_dots, weight_grads
from test_oba import make

pytestmark = pytest.mark.usefixtures("float64")


class ScaledMLP(nn.Module):
    """fc1 -> * scale (a bare nn.Parameter in fc1's group) -> tanh -> fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) * self.scale))


class ConcatMLP(nn.Module):
    """fc2 reads [tanh(fc1(x)), x]: only 6 of its 11 in-channels belong to a structure, so theta_M must
    not be a shift of *every* gate entry."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(11, 3)

    def forward(self, x):
        return self.fc2(torch.cat([torch.tanh(self.fc1(x)), x], 1))


# --------------------------------------------------------------------------------------------------
# hand-written structures and the dense reference

def _column(model, parts):
    """Flat parameter vector holding theta on the given (param name, index) parts, 0 elsewhere."""
    p = {n: t.detach() for n, t in model.named_parameters()}
    out = {n: torch.zeros_like(t) for n, t in p.items()}
    for name, idx in parts:
        out[name][idx] += p[name][idx]  # += : a weight listed twice counts twice
    return torch.cat([t.reshape(-1) for t in out.values()])


def tiny_structures(model: Tiny) -> dict[str, torch.Tensor]:
    """Root -> (P, channels) matrix whose columns are the theta_s of that group's channels."""
    c1 = [_column(model, [("conv1.weight", c), ("conv1.bias", c), ("bn1.weight", c), ("bn1.bias", c),
                          ("conv2.weight", (slice(None), c))]) for c in range(4)]
    c2 = [_column(model, [("conv2.weight", c), ("conv2.bias", c), ("bn2.weight", c), ("bn2.bias", c),
                          ("fc.weight", (slice(None), slice(16 * c, 16 * c + 16)))]) for c in range(5)]
    return {"conv1": torch.stack(c1, 1), "conv2": torch.stack(c2, 1)}


def scaled_structures(model: ScaledMLP) -> dict[str, torch.Tensor]:
    cols = [_column(model, [("fc1.weight", c), ("fc1.bias", c), ("scale", c), ("fc2.weight", (slice(None), c))])
            for c in range(6)]
    return {"fc1": torch.stack(cols, 1)}


def order_like(scores, by_root: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate per-root column blocks in the order of ``scores.groups`` (the order of Q)."""
    assert {g.root for g in scores.groups} == set(by_root)
    return torch.cat([by_root[g.root] for g in scores.groups], 1)


def dense_ggn(model, x, y):
    """g and GGN = sum_n J_n^T Lambda_n J_n of the mean cross-entropy, over flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def logits(flat):
        return functional_call(model, {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}, (x,))

    J = jacrev(logits)(theta)  # (N, K, P)
    z = logits(theta).detach()
    g = torch.func.grad(lambda f: F.cross_entropy(logits(f), y))(theta)
    p = z.softmax(-1)
    lam = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / x.shape[0]
    return g, torch.einsum("nkp,nkl,nlq->pq", J, lam, J)


def expected(model, batches, theta_s):
    """Means over batches of theta_s^T g, Q = theta_s^T GGN theta_s', and theta_s^T GGN theta_M."""
    gs, qs = [], []
    for x, y in batches:
        g, ggn = dense_ggn(model, x, y)
        gs.append(theta_s.T @ g)
        qs.append(theta_s.T @ ggn @ theta_s)
    g, q = torch.stack(gs).mean(0), torch.stack(qs).mean(0)
    return {"g": g, "Q": q, "u": q.sum(1),
            "sosp-h": g.abs() + 0.5 * q.sum(1).abs(), "sosp-i": g.abs() + 0.5 * q.abs().sum(1)}


def flat_values(scores, key=None):
    """Concatenate per-group vectors (scores, or an extras entry keyed by root) in group order."""
    src = scores.by_module() if key is None else scores.extras[key]
    return torch.cat([src[g.root] for g in scores.groups])


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 3, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    return model, [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal batches: the mean is over batches


# --------------------------------------------------------------------------------------------------
# against the dense reference

def test_tiny_matches_dense_ggn(tiny):
    model, batches = tiny
    h = pyobc.score(model, batches, "sosp-h")
    i = pyobc.score(model, batches, "sosp-i")
    ref = expected(model, batches, order_like(h, tiny_structures(model)))
    kw = dict(rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(i.extras["Q"], ref["Q"], **kw)
    assert i.extras["Q"].dtype == torch.float64 and i.extras["Q"].device.type == "cpu"
    for s in (h, i):
        torch.testing.assert_close(flat_values(s, "theta_g"), ref["g"], **kw)
        torch.testing.assert_close(flat_values(s, "theta_u"), ref["u"], **kw)
    torch.testing.assert_close(flat_values(h), ref["sosp-h"], **kw)
    torch.testing.assert_close(flat_values(i), ref["sosp-i"], **kw)
    assert h.batches == i.batches == 2
    # the curvature term matters here: the scores are not the first-order ones alone
    assert (ref["sosp-h"] - ref["g"].abs()).abs().max() > 1e-3 * ref["sosp-h"].abs().max()


def test_each_batch_alone_and_their_mean(tiny):
    """Signed terms are averaged over batches before the absolute values (not a mean of scores)."""
    model, batches = tiny
    both = pyobc.score(model, batches, "sosp-i")
    singles = [pyobc.score(model, [b], "sosp-i") for b in batches]
    torch.testing.assert_close(both.extras["Q"], (singles[0].extras["Q"] + singles[1].extras["Q"]) / 2)
    for root in ("conv1", "conv2"):
        for key in ("theta_g", "theta_u"):
            torch.testing.assert_close(both.extras[key][root],
                                       (singles[0].extras[key][root] + singles[1].extras[key][root]) / 2)


def test_first_order_term_is_group_sum_of_theta_g(tiny):
    model, batches = tiny
    want = {"conv1": 0, "conv2": 0}
    for x, y in batches:
        for root, members in member_dots(model, weight_grads(model, x, y)).items():
            want[root] = want[root] + sum(members) / len(batches)
    for method in ("sosp-h", "sosp-i"):
        got = pyobc.score(model, batches, method).extras["theta_g"]
        for root in want:
            torch.testing.assert_close(got[root], want[root], rtol=1e-9, atol=1e-14)


def test_bare_parameter_member_sosp_h_dense_and_sosp_i_error():
    torch.manual_seed(0)
    model = ScaledMLP().eval()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    h = pyobc.score(model, [(x, y)], "sosp-h")
    ref = expected(model, [(x, y)], order_like(h, scaled_structures(model)))
    torch.testing.assert_close(flat_values(h, "theta_g"), ref["g"], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(flat_values(h, "theta_u"), ref["u"], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(flat_values(h), ref["sosp-h"], rtol=1e-9, atol=1e-13)
    with pytest.raises(NotImplementedError, match=r"scale \(Parameter.*ignored_layers=\['fc1'\]"):
        pyobc.score(model, [(x, y)], "sosp-i")


# --------------------------------------------------------------------------------------------------
# SOSP-H's theta_s^T u = row sums of SOSP-I's Q

def _concat():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return ConcatMLP().eval(), torch.randn(5, 5, generator=g), torch.randint(0, 3, (5,), generator=g)


@pytest.mark.parametrize("name", ["pool_bn", "residual", "tiny", "mlp", "concat"])
@pytest.mark.parametrize("jvp", ["forward", "double-vjp"])
def test_theta_u_is_row_sum_of_Q(name, jvp):
    model, x, y = _concat() if name == "concat" else make(name)
    batches = [(x, y), (x.flip(0)[:2], y.flip(0)[:2])]
    h = pyobc.score(model, batches, "sosp-h", jvp=jvp)
    i = pyobc.score(model, batches, "sosp-i")
    u = flat_values(h, "theta_u")
    assert u.abs().max() > 0
    torch.testing.assert_close(u, i.extras["Q"].sum(1), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(flat_values(i, "theta_u"), i.extras["Q"].sum(1))
    torch.testing.assert_close(flat_values(h, "theta_g"), flat_values(i, "theta_g"), rtol=1e-9, atol=1e-14)
    Q = i.extras["Q"]
    torch.testing.assert_close(Q, Q.T, rtol=1e-9, atol=1e-14)
    assert torch.linalg.eigvalsh(Q).min() > -1e-12  # a Gauss-Newton matrix is positive semi-definite


def test_attention_sosp_h_modes_agree_and_sosp_i_names_the_layer():
    model, x, y = make("attention")
    a = pyobc.score(model, [(x, y)], "sosp-h", jvp="forward")
    b = pyobc.score(model, [(x, y)], "sosp-h", jvp="double-vjp")
    for key in ("theta_g", "theta_u"):
        torch.testing.assert_close(flat_values(a, key), flat_values(b, key), rtol=1e-9, atol=1e-14)
    assert flat_values(a, "theta_u").abs().max() > 0
    with pytest.raises(NotImplementedError, match=r"attn \(MultiheadAttention"):
        pyobc.score(model, [(x, y)], "sosp-i")


class _PlainRelu(torch.autograd.Function):
    """A custom op without a forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0)


class _CustomOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(_PlainRelu.apply(self.fc1(x)))


def test_auto_falls_back_without_forward_mode():
    torch.manual_seed(0)
    model = _CustomOpNet()
    batch = [(torch.randn(5, 5), torch.randint(0, 3, (5,)))]
    with pytest.raises(NotImplementedError, match="jvp"):
        pyobc.score(model, batch, "sosp-h", jvp="forward")
    auto = pyobc.score(model, batch, "sosp-h")
    ref = pyobc.score(model, batch, "sosp-h", jvp="double-vjp")
    torch.testing.assert_close(flat_values(auto), flat_values(ref))
    torch.testing.assert_close(flat_values(auto, "theta_u"), pyobc.score(model, batch, "sosp-i").extras["Q"].sum(1))


# --------------------------------------------------------------------------------------------------
# API behaviour

def test_model_left_untouched(tiny):
    model, batches = tiny
    model.train()
    model.bn1.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    for method in ("sosp-h", "sosp-i"):
        pyobc.score(model, batches, method)
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_memory_limit(tiny):
    model, batches = tiny
    # S x S alone (9 structures) exceeds 1000 bytes: refused before any batch runs
    with pytest.raises(SOSPMemoryError, match=r"bytes.*ignored_layers") as err:
        pyobc.score(model, batches, "sosp-i", max_memory=1000)
    assert isinstance(err.value, MemoryError) and "9 structures" in str(err.value)
    # enough for the S x S matrices, not for a batch's N x K x S output effects
    with pytest.raises(MemoryError, match=r"batch 4 x 3 outputs.*smaller batch"):
        pyobc.score(model, batches, "sosp-i", max_memory=3 * 8 * 81 + 100)
    pyobc.score(model, batches, "sosp-i", max_memory=10**6)


def test_options_validated_and_scores_save(tiny, tmp_path):
    model, batches = tiny
    with pytest.raises(ValueError, match="jvp"):
        pyobc.score(model, batches, "sosp-h", jvp="finite-differences")
    with pytest.raises(TypeError, match="max_memory"):
        pyobc.score(model, batches, "sosp-i", max_memory="lots")
    assert "reconstructed" in pyobc.methods()["sosp-h"] and "reconstructed" in pyobc.methods()["sosp-i"]
    s = pyobc.score(model, batches, "sosp-i")
    s.save(tmp_path / "s.pt")
    back = pyobc.Scores.load(tmp_path / "s.pt")
    torch.testing.assert_close(back.extras["Q"], s.extras["Q"])
    torch.testing.assert_close(back.extras["theta_u"]["conv1"], s.extras["theta_u"]["conv1"])


def test_sosp_h_micro_batches_equal_whole_batch():
    torch.manual_seed(0)
    model = Tiny().eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 3, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    whole = pyobc.score(model, [(x, y)], "sosp-h", micro_batch=None)
    parts = pyobc.score(model, [(x, y)], "sosp-h", micro_batch=2)
    for k, v in whole.by_module().items():
        torch.testing.assert_close(parts.by_module()[k], v, rtol=1e-9, atol=1e-13)
