"""First-order criteria and OBD against independent computations on tiny float64 nets.

The expected values are written out by hand from the network's structure (which weights go with which
channel), and gradients come from plain autograd or per-sample Python loops — never from pyobc's own
grouping, layout or per-sample machinery.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc

pytestmark = pytest.mark.usefixtures("float64")


class Tiny(nn.Module):
    """conv1(3->4)+bn1 -> relu -> conv2(4->5)+bn2 -> relu -> flatten -> fc(5*4*4 -> 3).

    Groups: conv1 channel c = {conv1.W[c], conv1.b[c], bn1[c], conv2.W[:, c]};
            conv2 channel c = {conv2.W[c], conv2.b[c], bn2[c], fc.W[:, 16c:16c+16]}.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4 * 4, 3)
        with torch.no_grad():  # non-trivial BN so that its terms matter
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def member_dots(model: Tiny, grads: dict) -> dict[str, list[torch.Tensor]]:
    """Per group (root name), per member, per channel: <grad, theta> over the member's weights."""
    p = dict(model.named_parameters())
    d = {n: (p[n].detach() * grads[n]) for n in p}
    g1 = [
        d["conv1.weight"].sum((1, 2, 3)) + d["conv1.bias"],
        d["bn1.weight"] + d["bn1.bias"],
        d["conv2.weight"].sum((0, 2, 3)),
    ]
    g2 = [
        d["conv2.weight"].sum((1, 2, 3)) + d["conv2.bias"],
        d["bn2.weight"] + d["bn2.bias"],
        d["fc.weight"].sum(0).view(5, 16).sum(1),
    ]
    return {"conv1": g1, "conv2": g2}


def weight_grads(model, x, y, loss_extra=None):
    model.eval()
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    if loss_extra is not None:
        loss = loss + loss_extra(model)
    gs = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, gs))


@pytest.fixture()
def setup(float64):
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(12, 3, 4, 4)
    y = torch.randint(0, 3, (12,))
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    return model, x, y, loader


def _by_root(scores):
    out = scores.by_module()
    assert set(out) == {"conv1", "conv2"}, out.keys()
    return out


def test_groups_of_tiny_net(setup):
    model, x, _, _ = setup
    groups = {g.root: g for g in pyobc.build_groups(model, x[:2])}
    assert set(groups) == {"conv1", "conv2"}
    kinds = sorted((m.module, m.kind) for m in groups["conv2"].members)
    assert kinds == [("bn2", "norm"), ("conv2", "out"), ("fc", "in")]
    fc = next(m for m in groups["conv2"].members if m.module == "fc")
    assert torch.equal(fc.root, torch.arange(80) // 16)  # flatten: 16 features per conv2 channel


def test_jacobian_batch_rows_vs_weight_gradients(setup):
    model, _, _, loader = setup
    expected = {"conv1": 0, "conv2": 0}
    for xb, yb in loader:  # one row per mini-batch: sum over members and rows of <g, w>^2
        dots = member_dots(model, weight_grads(model, xb, yb))
        for root, members in dots.items():
            expected[root] = expected[root] + sum(m ** 2 for m in members)
    got = _by_root(pyobc.score(model, loader, "jacobian"))
    for root in expected:
        torch.testing.assert_close(got[root].double(), expected[root], rtol=1e-9, atol=1e-14)
    # the alias from the paper's name gives the same result
    alias = pyobc.score(model, loader, "obc").by_module()
    torch.testing.assert_close(alias["conv1"], got["conv1"])


def test_jacobian_sample_rows_vs_brute_force_loop(setup):
    model, x, y, loader = setup
    expected = {"conv1": 0, "conv2": 0}
    for n in range(x.shape[0]):  # gradient of each single sample's loss
        dots = member_dots(model, weight_grads(model, x[n:n + 1], y[n:n + 1]))
        for root, members in dots.items():
            expected[root] = expected[root] + sum(m ** 2 for m in members)
    got = _by_root(pyobc.score(model, loader, "jacobian", rows="sample"))
    for root in expected:
        torch.testing.assert_close(got[root].double(), expected[root], rtol=1e-9, atol=1e-14)


def test_taylor_group_form_and_batch_mean(setup):
    model, _, _, loader = setup
    per_batch = []
    for xb, yb in loader:
        dots = member_dots(model, weight_grads(model, xb, yb))
        per_batch.append({r: sum(m) ** 2 for r, m in dots.items()})  # square of the whole group's sum
    got = _by_root(pyobc.score(model, loader, "taylor"))
    for root in ("conv1", "conv2"):
        expected = (per_batch[0][root] + per_batch[1][root]) / 2  # mean over batches
        torch.testing.assert_close(got[root].double(), expected, rtol=1e-9, atol=1e-14)
    # each batch alone gives its own term: the combination over the loader is their mean
    singles = [_by_root(pyobc.score(model, [b], "taylor")) for b in loader]
    torch.testing.assert_close(got["conv1"], (singles[0]["conv1"] + singles[1]["conv1"]) / 2)


def test_taylor_sees_batchnorm_gradients(setup):
    """A loss term that moves only BatchNorm gradients must move the Taylor score of bn1's group.

    (Torch-Pruning 1.6.1's Taylor importance ignores BatchNorm gradients; pyobc must not.)
    """
    model, _, _, loader = setup

    def extra(m):
        return 0.3 * (m.bn1.weight.sum() + m.bn1.bias.sum())

    def loss_fn(m, batch):
        xb, yb = batch
        return F.cross_entropy(m(xb), yb) + extra(m)

    plain = _by_root(pyobc.score(model, loader, "taylor"))
    shifted = _by_root(pyobc.score(model, loader, "taylor", loss_fn=loss_fn))
    assert not torch.allclose(plain["conv1"], shifted["conv1"], rtol=1e-3)
    torch.testing.assert_close(plain["conv2"], shifted["conv2"])  # bn2 untouched
    # and the changed value is the hand-computed one including the BN terms
    expected = 0
    for xb, yb in loader:
        dots = member_dots(model, weight_grads(model, xb, yb, loss_extra=extra))
        expected = expected + sum(dots["conv1"]) ** 2
    torch.testing.assert_close(shifted["conv1"].double(), expected / 2, rtol=1e-9, atol=1e-14)


def test_obd_vs_per_sample_loop(setup):
    model, x, y, loader = setup
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for n in range(x.shape[0]):
        g = weight_grads(model, x[n:n + 1], y[n:n + 1])
        for k in fisher:
            fisher[k] += g[k] ** 2
    fisher = {k: v / x.shape[0] for k, v in fisher.items()}
    per_weight = {k: 0.5 * params[k].detach() ** 2 * fisher[k] for k in params}
    # group sums written out by hand (every weight removed with the channel)
    exp1 = (per_weight["conv1.weight"].sum((1, 2, 3)) + per_weight["conv1.bias"] + per_weight["bn1.weight"]
            + per_weight["bn1.bias"] + per_weight["conv2.weight"].sum((0, 2, 3)))
    exp2 = (per_weight["conv2.weight"].sum((1, 2, 3)) + per_weight["conv2.bias"] + per_weight["bn2.weight"]
            + per_weight["bn2.bias"] + per_weight["fc.weight"].sum(0).view(5, 16).sum(1))
    scores = pyobc.score(model, loader, "obd", granularity="weight")
    got = _by_root(scores)
    torch.testing.assert_close(got["conv1"].double(), exp1, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got["conv2"].double(), exp2, rtol=1e-9, atol=1e-15)
    by_param = scores.by_parameter()
    assert set(by_param) == set(params)
    for k in params:
        torch.testing.assert_close(by_param[k].double(), per_weight[k], rtol=1e-9, atol=1e-15)


class Tok(nn.Module):
    """Tokens through linear layers, LayerNorm, nn.MultiheadAttention and a bare position parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.ln = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos
        a = self.ln(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def test_obd_on_linear_tokens_and_attention_matches_loop(float64):
    """3-D linear inputs and nn.MultiheadAttention go through other per-sample paths."""
    torch.manual_seed(1)
    model = Tok()
    x = torch.randn(6, 5, 3)
    y = torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for n in range(6):
        g = weight_grads(model, x[n:n + 1], y[n:n + 1])
        for k in fisher:
            fisher[k] += g[k] ** 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = pyobc.score(model, [(x, y)], "obd", granularity="weight")
    # vmap over the attention module batches it (math attention), no per-sample fallback loop with warnings
    assert not [w for w in caught if "batching rule" in str(w.message)]
    by_param = scores.by_parameter()
    for k in params:
        torch.testing.assert_close(by_param[k].double(), 0.5 * params[k].detach() ** 2 * fisher[k] / 6,
                                   rtol=1e-8, atol=1e-14, msg=k)


class Reached(nn.Module):
    """What OBD's streamed backward must still serve exactly: a layer called twice (its calls' gradients
    added per sample before squaring), a layer fed only by a buffer (not on the way from the inputs),
    an in-place op on the model's input, and (``tokens=True``) integer inputs with no float tensor."""

    def __init__(self, tokens: bool):
        super().__init__()
        self.tokens = tokens
        self.emb = nn.Embedding(7, 6) if tokens else nn.Linear(3, 6)
        self.shared = nn.Linear(6, 6)
        self.register_buffer("const", torch.randn(6) * 0.5)
        self.bias_net = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if not self.tokens:
            x = x.mul_(1.0)  # in place on the input the model was given
        h = self.emb(x).mean(1) + self.bias_net(self.const.expand(x.shape[0], 6))
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h)


@pytest.mark.parametrize("tokens", [False, True])
def test_obd_streamed_backward_serves_every_layer(float64, tokens):
    torch.manual_seed(2)
    model = Reached(tokens)
    x = torch.randint(0, 7, (5, 4)) if tokens else torch.randn(5, 4, 3)
    y = torch.randint(0, 3, (5,))
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for n in range(5):
        g = weight_grads(model, x[n:n + 1].clone(), y[n:n + 1])
        for k in fisher:
            fisher[k] += g[k] ** 2
    by_param = pyobc.score(model, [(x, y)], "obd", granularity="weight").by_parameter()
    for k in params:
        torch.testing.assert_close(by_param[k].double(), 0.5 * params[k].detach() ** 2 * fisher[k] / 5,
                                   rtol=1e-8, atol=1e-14, msg=k)


def test_obd_streamed_backward_releases_records_as_it_goes():
    """A layer's recorded activations are dropped once its sums are formed, not at the end of the batch:
    the output of the last batch norm (kept by no autograd node: the ReLU after it saves its own output)
    is freed before the first conv's sums are computed. Held to the end, such records kept the backward
    from reusing their memory (1.6x slower OBD under glibc, issue #15)."""
    import weakref

    from pyobc.scoring import per_sample_pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 2, (3,))
    model(x)
    last_bn = model[4]
    seen: list = []
    alive_at_first_conv: list = []
    handle = last_bn.register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o)))
    original = per_sample_pass.sq_grad_sums

    def spy(module, calls, scale, only=None):
        if module is model[0]:
            alive_at_first_conv.append(seen[-1]() is not None)
        return original(module, calls, scale, only)

    try:
        per_sample_pass.sq_grad_sums = spy
        pyobc.score(model, [(x, y)], "obd")
    finally:
        per_sample_pass.sq_grad_sums = original
        handle.remove()
    assert alive_at_first_conv and not any(alive_at_first_conv)


def test_streamed_pass_refuses_what_its_released_records_would_serve(monkeypatch):
    """After the streamed OBD pass, asking the same pass for per-sample gradients is an error that names
    the reason, not a wrong "module was not called" message or an empty result."""
    import pyobc.criteria.obd as obd_module
    from pyobc.scoring.per_sample_pass import PerSamplePass

    passes = []

    class Kept(PerSamplePass):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            passes.append(self)

    monkeypatch.setattr(obd_module, "PerSamplePass", Kept)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    pyobc.score(model, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))], "obd")
    assert passes and passes[0].sq_grad_sums()
    with pytest.raises(RuntimeError, match="sq_sums=True"):
        passes[0].grads()


def test_magnitude_by_hand(setup):
    model, x, _, _ = setup
    p = {n: t.detach() for n, t in model.named_parameters()}
    for power in (1, 2):
        a = {n: t.abs() ** power for n, t in p.items()}
        exp1 = (a["conv1.weight"].sum((1, 2, 3)) + a["conv1.bias"] + a["bn1.weight"] + a["bn1.bias"]
                + a["conv2.weight"].sum((0, 2, 3)))
        got = pyobc.score(model, None, "magnitude", example_inputs=x[:2], p=power).by_module()["conv1"]
        torch.testing.assert_close(got.double(), exp1)


def test_jacobian_sample_rows_with_attention_and_bare_parameter(float64):
    """Activation rows (linear, LayerNorm) and per-sample-gradient rows (attention, the bare position
    parameter) against a per-sample loop through the weight-space path (checked on Tiny above)."""
    from pyobc.scoring.layout import Layout

    torch.manual_seed(2)
    model = Tok().eval()
    x, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4,))
    groups = pyobc.build_groups(model, x[:2])
    layout = Layout(groups, dict(model.named_parameters()))
    theta = {n: p.detach() for n, p in model.named_parameters()}
    total = 0
    for n in range(4):
        m = layout.members(layout.sources(theta, weight_grads(model, x[n:n + 1], y[n:n + 1])))
        total = total + m * m
    expected = layout.split(layout.group_sum(total))
    got = pyobc.score(model, [(x, y)], "jacobian", rows="sample")
    for g, e in zip(groups, expected):
        torch.testing.assert_close(got.by_module()[g.root].double(), e, rtol=1e-8, atol=1e-14)
