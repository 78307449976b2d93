"""OBA against dense Hessians from torch.func on tiny float64 nets, and the homogeneity identity."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

import pyobc
from test_criteria import Tiny, member_dots

pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------------
# tiny nets

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.gelu(self.fc1(x)))))


class PoolBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.3, 0.3)
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.c2(F.relu(self.c1(h))))
        return self.fc(h.mean((2, 3)))


class Attention(nn.Module):
    """One pre-norm attention block with an MLP, position embedding and a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 4)
        self.pos = nn.Parameter(torch.randn(1, 3, 4) * 0.3)
        self.ln = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.emb(x) + self.pos
        a = self.ln(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


NETS = {
    "mlp": (MLP, lambda g: torch.randn(5, 5, generator=g), 3),
    "pool_bn": (PoolBN, lambda g: torch.randn(4, 2, 4, 4, generator=g), 3),
    "residual": (Residual, lambda g: torch.randn(3, 2, 4, 4, generator=g), 2),
    "tiny": (Tiny, lambda g: torch.randn(3, 3, 4, 4, generator=g), 3),
    "attention": (Attention, lambda g: torch.randn(3, 3, 3, generator=g), 2),
}


def make(name):
    torch.manual_seed(0)
    cls, data, k = NETS[name]
    g = torch.Generator().manual_seed(1)
    model = cls().eval()
    x = data(g)
    y = torch.randint(0, k, (x.shape[0],), generator=g)
    return model, x, y


# --------------------------------------------------------------------------------------------------
# dense reference

def dense(model, x, y):
    """theta, g, H theta, GGN v and H v (flat) from torch.func, with v = theta off norm parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    norm_mods = {n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))}
    v = torch.cat([torch.zeros(s) if n.rpartition(".")[0] in norm_mods else theta[o:o + s]
                   for n, s, o in zip(names, sizes, torch.tensor([0] + sizes).cumsum(0).tolist())])

    def unflat(flat):
        return {n: t.view(sh) for n, t, sh in zip(names, flat.split(sizes), shapes)}

    def logits(flat):
        return functional_call(model, unflat(flat), (x,))

    def loss(flat):
        return F.cross_entropy(logits(flat), y)

    from pyobc.scoring.gates import second_order_mode  # math attention, composite LayerNorm
    with second_order_mode():
        g = torch.func.grad(loss)(theta)
        H = hessian(loss)(theta)
        J = jacrev(logits)(theta)  # (N, K, P)
        z = logits(theta).detach()
    p = z.softmax(-1)
    lam = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / x.shape[0]
    ggn = torch.einsum("nkp,nkl,nlq->pq", J, lam, J)
    split = lambda flat: unflat(flat)  # noqa: E731
    return {
        "theta": split(theta), "g": split(g),
        "S_inter": split(theta * ((H - ggn) @ v)),
        "S_full": split(theta * (H @ theta)),
        "S_homog": split(theta * g),
    }


def _assert_params_close(got, expected, **kw):
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], msg=k, **kw)


@pytest.mark.parametrize("name", list(NETS))
def test_oba_per_weight_equals_dense_hessian(name):
    model, x, y = make(name)
    ref = dense(model, x, y)
    got = pyobc.score(model, [(x, y)], "oba", granularity="weight").by_parameter()
    _assert_params_close(got, ref["S_inter"], rtol=1e-7, atol=1e-12)
    full = pyobc.score(model, [(x, y)], "oba", granularity="weight", hessian="full").by_parameter()
    _assert_params_close(full, ref["S_full"], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("hess", ["inter-layer", "full"])
@pytest.mark.parametrize("ad", ["forward", "reverse"])
def test_channel_path_agrees_with_weight_path(name, hess, ad):
    """Channel scores come from the gated pass (no weight gradients; forward-over-reverse or two reverse
    passes); per-weight scores from a plain double backward (checked against dense Hessians above).
    Their aggregates must agree."""
    model, x, y = make(name)
    batches = [(x, y), (x.flip(0), y.flip(0))]
    for how in ("sum", "mean", "max"):
        kw = dict(hessian=hess, group_reduction=how, normalize="none")
        a = pyobc.score(model, batches, "oba", ad=ad, **kw).by_module()
        b = pyobc.score(model, batches, "oba", granularity="weight", **kw).by_module()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-12, msg=f"{how} {k}")


def test_channel_scores_by_hand_on_tiny():
    """Reference aggregation written out: |member sums of S| (one batch), summed or averaged."""
    model, x, y = make("tiny")
    S = dense(model, x, y)["S_inter"]
    members = member_dots(model, {k: v / model.state_dict()[k] for k, v in S.items()})  # sums of S
    raw = pyobc.score(model, [(x, y)], "oba", group_reduction="sum", normalize="none").by_module()
    for root, ms in members.items():
        torch.testing.assert_close(raw[root].double(), sum(m.abs() for m in ms), rtol=1e-7, atol=1e-12)
    # defaults: mean over non-zero members, then divide by the group maximum
    default = pyobc.score(model, [(x, y)], "oba").by_module()
    for root, ms in members.items():
        stacked = torch.stack([m.abs() for m in ms])
        mean = stacked.sum(0) / (stacked != 0).sum(0).clamp_min(1)
        torch.testing.assert_close(default[root].double(), mean / mean.max(), rtol=1e-7, atol=1e-12)


class Homogeneous(nn.Module):
    """Bias-free, norm-free ReLU net with p = 4 conv/linear layers (positively homogeneous)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.f1 = nn.Linear(4 * 16, 5, bias=False)
        self.f2 = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.f2(F.relu(self.f1(x.flatten(1))))


def test_homogeneity_identity():
    """S = (p - 1) theta * g exactly for a positively homogeneous net with p layers."""
    torch.manual_seed(0)
    model = Homogeneous().eval()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    ref = dense(model, x, y)
    got = pyobc.score(model, [(x, y)], "oba", granularity="weight").by_parameter()
    _assert_params_close(got, {k: 3 * v for k, v in ref["S_homog"].items()}, rtol=1e-8, atol=1e-12)
    # and at channel level through the gated pass: per member 3 * (theta . g), summed as |.|
    raw = pyobc.score(model, [(x, y)], "oba", group_reduction="sum", normalize="none").by_module()
    tg = {k: v for k, v in ref["S_homog"].items()}
    exp_c1 = (3 * tg["c1.weight"].sum((1, 2, 3))).abs() + (3 * tg["c2.weight"].sum((0, 2, 3))).abs()
    torch.testing.assert_close(raw["c1"].double(), exp_c1, rtol=1e-8, atol=1e-12)


def test_layer_norm_second_order_matches_finite_differences():
    """Independent of any autograd second derivative: central differences of exact gradients.

    PyTorch's fused LayerNorm gives a wrong mixed derivative d(dL/dgamma)/dx; pyobc must not inherit it.
    """
    model, x, y = make("attention")
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def grad_at(params):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        from pyobc.scoring.gates import second_order_mode
        with second_order_mode():
            loss = F.cross_entropy(functional_call(model, p, (x,)), y)
        return dict(zip(names, torch.autograd.grad(loss, [p[n] for n in names])))

    h = 1e-5
    plus = grad_at({k: v * (1 + h) for k, v in theta.items()})  # v = theta on every parameter
    minus = grad_at({k: v * (1 - h) for k, v in theta.items()})
    fd = {k: theta[k] * (plus[k] - minus[k]) / (2 * h) for k in names}
    got = pyobc.score(model, [(x, y)], "oba", granularity="weight", hessian="full").by_parameter()
    _assert_params_close(got, fd, rtol=1e-5, atol=1e-9)


def test_delta_adds_first_order_term():
    model, x, y = make("mlp")
    ref = dense(model, x, y)
    got = pyobc.score(model, [(x, y)], "oba", granularity="weight", delta=0.5).by_parameter()
    expected = {k: ref["S_inter"][k] + 0.5 * ref["theta"][k] * ref["g"][k] for k in ref["theta"]}
    _assert_params_close(got, expected, rtol=1e-7, atol=1e-12)


def test_attention_projections_are_scored():
    """The reference code skips attention projections; pyobc scores q/k/v/out with their terms."""
    model, x, y = make("attention")
    s = pyobc.score(model, [(x, y)], "oba")
    groups = {g.root: g for g in s.groups}
    attn_members = [m for g in groups.values() for m in g.members if m.kind == "attention"]
    assert attn_members, "the attention block must be part of a group"
    params = {sl.param for m in attn_members for sl in m.slices}
    assert {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"} <= params
    by_param = pyobc.score(model, [(x, y)], "oba", granularity="weight").by_parameter()
    assert by_param["attn.in_proj_weight"].abs().sum() > 0
    assert by_param["attn.out_proj.weight"].abs().sum() > 0


def test_oba_options_validated():
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="hessian"):
        pyobc.score(model, [(x, y)], "oba", hessian="diagonal")
    with pytest.raises(ValueError, match="group_reduction"):
        pyobc.score(model, [(x, y)], "oba", group_reduction="median")
    with pytest.raises(TypeError, match="delta"):
        pyobc.score(model, [(x, y)], "oba", delta="big")


@pytest.mark.parametrize("granularity", ["channel", "weight"])
@pytest.mark.parametrize("hess", ["inter-layer", "full"])
def test_micro_batches_equal_whole_batch(granularity, hess):
    model, _, _ = make("pool_bn")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 2, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    kw = dict(hessian=hess, granularity=granularity, normalize="none")
    whole = pyobc.score(model, [(x, y)], "oba", micro_batch=None, **kw)
    parts = pyobc.score(model, [(x, y)], "oba", micro_batch=3, **kw)  # 3 + 3 + 1 samples
    for k, v in whole.by_module().items():
        torch.testing.assert_close(parts.by_module()[k], v, rtol=1e-9, atol=1e-13)
    if granularity == "weight":
        for k, v in whole.by_parameter().items():
            torch.testing.assert_close(parts.by_parameter()[k], v, rtol=1e-9, atol=1e-13)


def test_micro_batches_refuse_a_loss_that_is_not_a_per_sample_mean():
    model, x, y = make("pool_bn")

    def summed(m, batch):  # a sum, not a mean: micro-batch weights would be wrong
        return F.cross_entropy(m(batch[0]), batch[1], reduction="sum")

    with pytest.raises(ValueError, match="micro_batch=None"):
        pyobc.score(model, [(x, y)], "oba", loss_fn=summed, micro_batch=2)
    pyobc.score(model, [(x, y)], "oba", loss_fn=summed, micro_batch=None)  # fine without splitting
    with pytest.raises(ValueError, match="micro_batch"):
        pyobc.score(model, [(x, y)], "oba", micro_batch=0)


class _Square(torch.autograd.Function):
    """``x ** 2`` with a twice-differentiable backward and no forward-mode formula (no ``jvp``)."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareNet(MLP):
    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(_Square.apply(self.fc1(x)))))


@pytest.mark.parametrize("hess", ["inter-layer", "full"])
def test_op_without_forward_mode_derivative_scores_with_two_reverse_passes(hess):
    """Channel scores run forward-over-reverse; an op that forward mode cannot pass (a custom Function
    without jvp) switches them, with a warning, to reverse-over-reverse: the same values as the weight
    path (itself checked against dense Hessians above)."""
    torch.manual_seed(0)
    model = SquareNet().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    kw = dict(hessian=hess, group_reduction="sum", normalize="none")
    with pytest.warns(UserWarning, match="two reverse passes"):
        a = pyobc.score(model, [(x, y)], "oba", **kw).by_module()
    b = pyobc.score(model, [(x, y)], "oba", granularity="weight", **kw).by_module()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-12)


class InPlaceReLU(PoolBN):
    """PoolBN with torchvision's ``ReLU(inplace=True)`` after the norm and after a conv; with
    ``toggle``, the first of them is in place only from the second call on (control flow that changes)."""

    def __init__(self, toggle: bool = False):
        super().__init__()
        self.toggle, self.calls = toggle, 0

    def forward(self, x):
        self.calls += 1
        y = self.bn1(self.conv1(x))
        y = F.relu(y) if self.toggle and self.calls < 3 else F.relu_(y)
        x = F.max_pool2d(y, 2)
        x = F.relu_(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("toggle", [False, True])
def test_gate_sites_modified_in_place_are_copied(toggle):
    """Unit gates return views, except at sites that a later in-place op modifies (learned on the first
    pass); a site that becomes in-place later is caught and relearned. Scores stay exact either way."""
    plain, x, y = make("pool_bn")
    model = InPlaceReLU(toggle).eval()
    model.load_state_dict(plain.state_dict())
    batches = [(x, y), (x.flip(0), y.flip(0)), (x[:2], y[:2])]
    kw = dict(group_reduction="sum", normalize="none")
    a = pyobc.score(model, batches, "oba", **kw).by_module()
    b = pyobc.score(plain, batches, "oba", granularity="weight", **kw).by_module()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-12)


def test_unit_gate_view_shares_storage_and_refuses_in_place_changes():
    from pyobc.scoring.unit_gate import unit_gate

    y, gate = torch.randn(2, 3, 4, requires_grad=True), torch.ones(3, requires_grad=True)
    view, copy = unit_gate(y, gate, 1, copy=False), unit_gate(y, gate, 1)
    assert view.data_ptr() == y.data_ptr() and copy.data_ptr() != y.data_ptr()
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        view.relu_()
    copy.relu_()  # a copy may be modified


def test_auto_ad_uses_forward_mode_for_conv_bn_nets_only():
    from pyobc.criteria.oba import _conv_bn_only

    assert _conv_bn_only(PoolBN()) and _conv_bn_only(MLP())
    assert not _conv_bn_only(Attention())
    assert not _conv_bn_only(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="ad"):
        pyobc.score(*make("mlp")[:1], [make("mlp")[1:]], "oba", ad="sideways")
