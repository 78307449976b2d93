"""Elimination-compensation (``ec``) against brute force and independent per-sample loops (float64).

* Second order: on ReLU nets the Gauss-Newton curvature in pre-activation space is the exact Hessian, so
  the score must equal the t^2 coefficient of the loss change measured by actually removing ``t * w``
  and applying ``t * beta*`` (after subtracting the first-order term from autograd gradients).
* Independent loops: ``h_bb``, ``h_wb``, ``h_ww`` (and the structured ``u`` moments) summed sample by
  sample and position by position from ``torch.func`` Jacobians/Hessians of explicitly written
  sub-networks, on nets with tanh (where the Gauss-Newton diagonal differs from the Hessian).
* On a briefly trained MLP, applying the shifts makes the true loss change of removing a weight smaller
  for most weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

import pyobc

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

T = 1e-3  # perturbation scale of the second-order checks


# --------------------------------------------------------------------------------------------------
# helpers


def loss_of(model, params, x, y, loss_fn=None):
    out = functional_call(model, params, (x,))
    return F.cross_entropy(out, y) if loss_fn is None else F.mse_loss(out, y)


def base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def gradients(model, x, y, loss_fn=None):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    loss = loss_of(model, params, x, y, loss_fn)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


class Brute:
    """Loss changes of a model measured by brute force on ``(x, y)``, for perturbations ``delta``."""

    def __init__(self, model, x, y, loss_fn=None):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.theta = base_params(model)
        self.grads = gradients(model, x, y, loss_fn)
        with torch.no_grad():
            self.f0 = self.out(self.theta)
            self.l0 = self.loss(self.f0)

    def out(self, params):
        return functional_call(self.model, params, (self.x,))

    def loss(self, f):
        return F.cross_entropy(f, self.y) if self.loss_fn is None else F.mse_loss(f, self.y)

    @torch.no_grad()
    def second_order(self, delta):
        """t^2 coefficient of L(theta + t*delta) - L(theta): one-sided with the first-order term (from
        autograd gradients) removed, and the symmetric estimate (the first-order term cancels there)."""
        first = sum((self.grads[n] * d).sum() for n, d in delta.items())
        moved = (lambda t: self.out({n: v + t * delta[n] if n in delta else v for n, v in self.theta.items()}))
        # steps of T in units of the largest entry of delta: the t^2 term stays far above rounding and
        # the pre-activations move by ~T. The perturbation lies in one layer of a ReLU net, so the outputs
        # are exactly linear in t unless a ReLU kink is crossed: then the step is made smaller.
        t = T / max(float(d.abs().max()) for d in delta.values())
        for _ in range(6):
            fp, fm = moved(t), moved(-t)
            if (fp + fm - 2 * self.f0).abs().max() <= 1e-12 * self.f0.abs().max():
                break
            t /= 4
        else:
            raise AssertionError("no kink-free step found")
        lp, lm = self.loss(fp), self.loss(fm)
        one_sided = (lp - self.l0 - t * first) / t ** 2
        symmetric = (lp + lm - 2 * self.l0) / (2 * t ** 2)
        return one_sided, symmetric


def check_close(pred, one_sided, symmetric, scale):
    torch.testing.assert_close(symmetric, pred, rtol=1e-5, atol=1e-7 * scale)
    torch.testing.assert_close(one_sided, pred, rtol=2e-4, atol=1e-6 * scale)


class MLP(nn.Module):
    def __init__(self, sizes=(5, 7, 6, 3)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class PixelNet(nn.Module):
    """conv1 3x3 -> relu -> conv2 3x3 -> relu -> conv3 1x1, trained with a per-pixel loss: a position's
    pre-activation of conv2/conv3 reaches the loss only through its own pixel, so the per-position
    curvature diagonal is exact there."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.conv3 = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class PixelCat(PixelNet):
    """PixelNet with conv1's output concatenated twice: each conv1 channel is two input channels of conv2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        return self.conv3(F.relu(self.conv2(torch.cat([h, h], 1))))


class FlatNet(nn.Module):
    """conv -> relu -> flatten -> fc -> relu -> out: the conv's channels are 9 in-features of fc each."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 3 * 3, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))


def shifted_delta(model, weight, bias, mask, shift):
    """Perturbation removing ``weight[mask]`` and adding ``shift`` to ``bias``."""
    p = dict(model.named_parameters())
    return {weight: -p[weight].detach() * mask, bias: shift}


# --------------------------------------------------------------------------------------------------
# second order vs brute force


def test_weight_scores_second_order_relu_mlp():
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(24, 5) + 0.5, torch.randint(0, 3, (24,))
    s = pyobc.score(model, [(x[:10], y[:10]), (x[10:], y[10:])], "ec", granularity="weight")
    scores, shifts = s.by_parameter(), s.extras["ec_shift"]
    assert set(scores) == set(shifts) == {"fc1.weight", "fc2.weight", "fc3.weight"}  # biases: no entry
    gen = torch.Generator().manual_seed(1)
    brute = Brute(model, x, y)
    for layer in ("fc1", "fc2", "fc3"):
        w = scores[f"{layer}.weight"]
        scale = w.abs().max()
        for k in torch.randperm(w.numel(), generator=gen)[:6].tolist():
            i, j = divmod(k, w.shape[1])
            mask = torch.zeros_like(w)
            mask[i, j] = 1
            shift = torch.zeros(w.shape[0])
            shift[i] = shifts[f"{layer}.weight"][i, j]
            one, sym = brute.second_order(shifted_delta(model, f"{layer}.weight", f"{layer}.bias", mask, shift))
            check_close(w[i, j], one, sym, scale)
    # and the shift is optimal: other shifts give a larger second-order change
    mask = torch.zeros(7, 5)
    mask[2, 3] = 1
    best = shifts["fc1.weight"][2, 3]
    for other in (0.0, best * 0.5, best * 1.5 + 0.1):
        shift = torch.zeros(7)
        shift[2] = other
        _, sym = brute.second_order(shifted_delta(model, "fc1.weight", "fc1.bias", mask, shift))
        assert sym > scores["fc1.weight"][2, 3] * (1 + 1e-6)


def test_weight_scores_second_order_conv():
    torch.manual_seed(2)
    model = PixelNet()
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6, 4, 4))
    s = pyobc.score(model, [(x, y)], "ec", granularity="weight")
    scores, shifts = s.by_parameter(), s.extras["ec_shift"]
    gen = torch.Generator().manual_seed(3)
    brute = Brute(model, x, y)
    for layer in ("conv2", "conv3"):
        w, beta = scores[f"{layer}.weight"], shifts[f"{layer}.weight"]
        assert beta.shape == w.shape
        scale = w.abs().max()
        for k in torch.randperm(w.numel(), generator=gen)[:6].tolist():
            mask = torch.zeros(w.numel())
            mask[k] = 1
            mask = mask.view_as(w)
            i = k // w[0].numel()
            shift = torch.zeros(w.shape[0])
            shift[i] = beta.reshape(-1)[k]
            one, sym = brute.second_order(shifted_delta(model, f"{layer}.weight", f"{layer}.bias", mask, shift))
            check_close((w * mask).sum(), one, sym, scale)


def _channel_check(model, x, y, root, consumer, loader=None, loss_fn=None, whole_column=False):
    """Remove channel ``c`` from the consumer with the bias shifts and compare with the group score.

    The neuron-local model treats the consumer's output units independently (no cross-unit curvature),
    so the score is the sum over units ``i`` of the second-order change of removing channel ``c`` from
    unit ``i`` alone (``W[i, S_c]`` and all its taps) with ``b_i += beta*_ic``. With ``whole_column``
    (a loss without cross-unit curvature) the whole column is removed at once.
    """
    s = pyobc.score(model, loader or [(x, y)], "ec", loss_fn=loss_fn)
    g, values = s.group(root)
    member = next(m for m in g.members if m.kind == "in")
    assert member.module == consumer and [m.module for m in g.members if m.kind == "in"] == [consumer]
    shift_matrix = s.extras["ec_channel_shift"][consumer]
    weight = dict(model.named_parameters())[f"{consumer}.weight"]
    assert shift_matrix.shape == weight.shape[:2]
    scale = values.abs().max()
    brute = Brute(model, x, y, loss_fn)
    units = [None] if whole_column else range(weight.shape[0])
    for c in range(g.size):
        cols = member.index[member.root == c]  # the consumer's input channels / features of channel c
        one = sym = 0
        for i in units:
            rows = slice(None) if i is None else slice(i, i + 1)
            mask = torch.zeros_like(weight)
            mask[rows, cols] = 1
            shift = torch.zeros(weight.shape[0])
            shift[rows] = shift_matrix[rows, cols].sum(1)
            o, m = brute.second_order(shifted_delta(model, f"{consumer}.weight", f"{consumer}.bias", mask, shift))
            one, sym = one + o, sym + m
        check_close(values[c], one, sym, scale)
    return s


def test_channel_scores_second_order():
    torch.manual_seed(4)
    mlp = MLP()
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    _channel_check(mlp, x, y, "fc1", "fc2", loader=[(x[:8], y[:8]), (x[8:], y[8:])])
    _channel_check(mlp, x, y, "fc2", "fc3")
    pix = PixelNet()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5, 4, 4))
    _channel_check(pix, x, y, "conv1", "conv2")  # 3x3 consumer: all taps of channel c removed together
    _channel_check(pix, x, y, "conv2", "conv3")
    _channel_check(PixelCat(), x, y, "conv1", "conv2")  # two input channels of conv2 per channel
    flat = FlatNet()
    x, y = torch.randn(12, 2, 5, 5), torch.randint(0, 3, (12,))
    _channel_check(flat, x, y, "conv", "fc")  # 9 in-features per channel after the flatten


def test_channel_scores_whole_column_with_separable_loss():
    """A squared-error head has no cross-unit curvature: removing the whole column with all the shifts
    matches the score exactly."""
    torch.manual_seed(12)
    mlp = MLP()
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    mse = (lambda m, b: F.mse_loss(m(b[0]), b[1]))
    _channel_check(mlp, x, y, "fc2", "fc3", loss_fn=mse, whole_column=True)


def test_structured_equals_sum_of_weight_scores_for_linear_consumers():
    """One in-feature per channel: the channel score is the column sum of per-weight scores and the
    channel shift is the per-weight shift (the weight variant's sum of shifts)."""
    torch.manual_seed(5)
    model = MLP()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    s = pyobc.score(model, [(x, y)], "ec", granularity="weight")
    torch.testing.assert_close(s.by_module()["fc1"], s.by_parameter()["fc2.weight"].sum(0))
    torch.testing.assert_close(s.extras["ec_channel_shift"]["fc2"], s.extras["ec_shift"]["fc2.weight"])
    # channel granularity gives the same group scores and channel shifts
    c = pyobc.score(model, [(x, y)], "ec")
    assert "ec_shift" not in c.extras
    for k, v in s.by_module().items():
        torch.testing.assert_close(c.by_module()[k], v)
    for k, v in s.extras["ec_channel_shift"].items():
        torch.testing.assert_close(c.extras["ec_channel_shift"][k], v)


def test_batch_split_gives_the_same_scores():
    torch.manual_seed(6)
    model = PixelNet()
    x, y = torch.randn(9, 2, 4, 4), torch.randint(0, 3, (9, 4, 4))
    for curvature in ("ggn", "fisher"):
        one = pyobc.score(model, [(x, y)], "ec", granularity="weight", curvature=curvature)
        two = pyobc.score(model, [(x[:4], y[:4]), (x[4:], y[4:])], "ec", granularity="weight", curvature=curvature)
        for k, v in one.by_parameter().items():
            torch.testing.assert_close(two.by_parameter()[k], v)
            torch.testing.assert_close(two.extras["ec_shift"][k], one.extras["ec_shift"][k])
        for k, v in one.by_module().items():
            torch.testing.assert_close(two.by_module()[k], v)


# --------------------------------------------------------------------------------------------------
# independent per-sample loops


class ConvTanh(nn.Module):
    """conv1 (reflect padding) -> tanh -> conv2 (stride 2, groups 2) -> tanh -> flatten -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(6 * 3 * 3, 3)

    def after_conv1(self, z):
        return self.fc(torch.tanh(self.conv2(torch.tanh(z))).flatten(1))

    def after_conv2(self, z):
        return self.fc(torch.tanh(z).flatten(1))

    def forward(self, x):
        return self.after_conv1(self.conv1(x))


class Tokens(nn.Module):
    """Linear layers on (N, tokens, features): positions of a linear layer are its tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 4, bias=False)  # no bias: no compensation, shift 0
        self.mid = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def after_emb(self, z):
        return self.head(torch.tanh(self.mid(torch.tanh(z))).mean(1))

    def after_mid(self, z):
        return self.head(torch.tanh(z).mean(1))

    def forward(self, x):
        return self.after_emb(self.emb(x))


def _phi(rest, z, target, curvature):
    """Per-element curvature of one sample's loss in pre-activation space, written out directly."""
    loss = (lambda f: F.cross_entropy(f, target))
    if curvature == "fisher":
        return jacrev(lambda zz: loss(rest(zz)))(z) ** 2
    f = rest(z)
    jac = jacrev(rest)(z).reshape(f.numel(), z.numel())
    lam = hessian(loss)(f).reshape(f.numel(), f.numel())
    return torch.einsum("ke,kl,le->e", jac, lam, jac).reshape(z.shape)


def _conv_patches(xp, i, oy, ox, stride, in_per_group, out_per_group):
    g = i // out_per_group
    return xp[g * in_per_group:(g + 1) * in_per_group, oy * stride:oy * stride + 3, ox * stride:ox * stride + 3]


def _reference(w, b, bb, wb, ww, n):
    """Score and shift from summed moments (written out per weight, as the definition says)."""
    if b is None:
        return 0.5 * w ** 2 * ww / n, torch.zeros_like(w)
    r = wb / bb.reshape((-1,) + (1,) * (w.dim() - 1))
    return 0.5 * w ** 2 * (ww - wb * r) / n, w * r


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_conv_and_flatten_layer_vs_loop(curvature):
    torch.manual_seed(7)
    model = ConvTanh()
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))
    s = pyobc.score(model, [(x[:2], y[:2]), (x[2:], y[2:])], "ec", granularity="weight", curvature=curvature)
    n = x.shape[0]
    W2, Wf = model.conv2.weight.detach(), model.fc.weight.detach()
    m = {k: torch.zeros_like(v) for k, v in
         {"bb2": model.conv2.bias, "wb2": W2, "ww2": W2, "bbf": model.fc.bias, "wbf": Wf, "wwf": Wf,
          "bb1": model.conv1.bias}.items()}
    uu1 = torch.zeros(6, 4)  # consumer conv2 (out i, conv1 channel c)
    u1 = torch.zeros(6, 4)
    uuf = torch.zeros(3, 6)  # consumer fc (out i, conv2 channel c): 9 features per channel
    uf = torch.zeros(3, 6)
    with torch.no_grad():
        for k in range(n):
            xk, yk = x[k:k + 1], y[k:k + 1]
            z1 = model.conv1(xk)
            a1 = torch.tanh(z1)
            z2 = model.conv2(a1)
            a2 = torch.tanh(z2).flatten(1)
            zf = model.fc(a2)
            with torch.enable_grad():
                phi2 = _phi(model.after_conv2, z2, yk, curvature)[0]
                phif = _phi(lambda z: z, zf, yk, curvature)[0]
            xp = F.pad(a1, (1, 1, 1, 1))[0]
            for i in range(6):
                for oy in range(3):
                    for ox in range(3):
                        a = _conv_patches(xp, i, oy, ox, 2, 2, 3)
                        p = phi2[i, oy, ox]
                        m["bb2"][i] += p
                        m["wb2"][i] += p * a
                        m["ww2"][i] += p * a ** 2
                        g = i // 3
                        for cl in range(2):  # u of conv1 channel c = 2g + cl at this position
                            u = (W2[i, cl] * a[cl]).sum()
                            u1[i, 2 * g + cl] += p * u
                            uu1[i, 2 * g + cl] += p * u ** 2
            m["bbf"] += phif
            m["wbf"] += phif[:, None] * a2[0][None, :]
            m["wwf"] += phif[:, None] * a2[0][None, :] ** 2
            for c in range(6):
                u = (Wf[:, 9 * c:9 * c + 9] * a2[0, 9 * c:9 * c + 9]).sum(1)
                uf[:, c] += phif * u
                uuf[:, c] += phif * u ** 2
    score2, shift2 = _reference(W2, model.conv2.bias, m["bb2"], m["wb2"], m["ww2"], n)
    scoref, shiftf = _reference(Wf, model.fc.bias, m["bbf"], m["wbf"], m["wwf"], n)
    got, shifts = s.by_parameter(), s.extras["ec_shift"]
    torch.testing.assert_close(got["conv2.weight"], score2, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(shifts["conv2.weight"], shift2, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got["fc.weight"], scoref, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(shifts["fc.weight"], shiftf, rtol=1e-9, atol=1e-15)
    assert "conv1.weight" in got and "conv1.bias" not in got
    # structured: consumer conv2 (grouped: channel c only reaches outputs of its group), consumer fc
    exp1 = 0.5 * (uu1 - u1 ** 2 / m["bb2"][:, None]).sum(0) / n
    expf = 0.5 * (uuf - uf ** 2 / m["bbf"][:, None]).sum(0) / n
    torch.testing.assert_close(s.by_module()["conv1"], exp1, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(s.by_module()["conv2"], expf, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(s.extras["ec_channel_shift"]["conv2"], u1 / m["bb2"][:, None], rtol=1e-9, atol=1e-15)
    fc_shift = s.extras["ec_channel_shift"]["fc"]
    torch.testing.assert_close(fc_shift.view(3, 6, 9).sum(-1), uf / m["bbf"][:, None], rtol=1e-9, atol=1e-15)


def test_conv_reflect_padding_vs_loop():
    torch.manual_seed(8)
    model = ConvTanh()
    x, y = torch.randn(3, 3, 6, 6), torch.randint(0, 3, (3,))
    s = pyobc.score(model, [(x, y)], "ec", granularity="weight")
    W1 = model.conv1.weight.detach()
    bb, wb, ww = torch.zeros(4), torch.zeros_like(W1), torch.zeros_like(W1)
    with torch.no_grad():
        for k in range(3):
            z1 = model.conv1(x[k:k + 1])
            with torch.enable_grad():
                phi = _phi(model.after_conv1, z1, y[k:k + 1], "ggn")[0]
            xp = F.pad(x[k:k + 1], (1, 1, 1, 1), mode="reflect")[0]
            for i in range(4):
                for oy in range(6):
                    for ox in range(6):
                        a = xp[:, oy:oy + 3, ox:ox + 3]
                        bb[i] += phi[i, oy, ox]
                        wb[i] += phi[i, oy, ox] * a
                        ww[i] += phi[i, oy, ox] * a ** 2
    score, shift = _reference(W1, model.conv1.bias, bb, wb, ww, 3)
    torch.testing.assert_close(s.by_parameter()["conv1.weight"], score, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(s.extras["ec_shift"]["conv1.weight"], shift, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_linear_tokens_and_bias_free_layer_vs_loop(curvature):
    torch.manual_seed(9)
    model = Tokens()
    x, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4,))
    s = pyobc.score(model, [(x, y)], "ec", granularity="weight", curvature=curvature)
    We, Wm = model.emb.weight.detach(), model.mid.weight.detach()
    acc = {"bbm": torch.zeros(5), "wbm": torch.zeros_like(Wm), "wwm": torch.zeros_like(Wm),
           "wwe": torch.zeros_like(We), "uu": torch.zeros(5, 4), "u": torch.zeros(5, 4)}
    with torch.no_grad():
        for k in range(4):
            ze = model.emb(x[k:k + 1])
            a = torch.tanh(ze)
            zm = model.mid(a)
            with torch.enable_grad():
                phie = _phi(model.after_emb, ze, y[k:k + 1], curvature)[0]
                phim = _phi(model.after_mid, zm, y[k:k + 1], curvature)[0]
            for t in range(5):
                acc["wwe"] += phie[t][:, None] * x[k, t][None, :] ** 2
                acc["bbm"] += phim[t]
                acc["wbm"] += phim[t][:, None] * a[0, t][None, :]
                acc["wwm"] += phim[t][:, None] * a[0, t][None, :] ** 2
                for c in range(4):  # emb channel c = one in-feature of mid
                    u = Wm[:, c] * a[0, t, c]
                    acc["u"][:, c] += phim[t] * u
                    acc["uu"][:, c] += phim[t] * u ** 2
    score_e, shift_e = _reference(We, None, None, None, acc["wwe"], 4)
    score_m, shift_m = _reference(Wm, model.mid.bias, acc["bbm"], acc["wbm"], acc["wwm"], 4)
    got, shifts = s.by_parameter(), s.extras["ec_shift"]
    torch.testing.assert_close(got["emb.weight"], score_e, rtol=1e-9, atol=1e-15)
    assert torch.equal(shifts["emb.weight"], torch.zeros_like(We))
    torch.testing.assert_close(got["mid.weight"], score_m, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(shifts["mid.weight"], shift_m, rtol=1e-9, atol=1e-15)
    exp = 0.5 * (acc["uu"] - acc["u"] ** 2 / acc["bbm"][:, None]).sum(0) / 4
    torch.testing.assert_close(s.by_module()["emb"], exp, rtol=1e-9, atol=1e-15)


class Conv1dNet(nn.Module):
    """conv_a -> tanh -> conv_b (stride 2, dilation 2) -> tanh -> flatten -> fc."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv1d(2, 3, 3, padding=2, dilation=2)
        self.conv_b = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2)
        self.fc = nn.Linear(4 * 4, 3)

    def rest(self, z):
        return self.fc(torch.tanh(z).flatten(1))

    def forward(self, x):
        return self.rest(self.conv_b(torch.tanh(self.conv_a(x))))


class Conv3dNet(nn.Module):
    """conv_a -> tanh -> conv_b (reflect padding, stride 2) -> tanh -> mean -> fc. (Circular padding
    would do as well here, but Torch-Pruning 1.6.1 hangs tracing it.)"""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv3d(2, 3, 2)
        self.conv_b = nn.Conv3d(3, 4, (2, 3, 3), stride=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4, 3)

    def rest(self, z):
        return self.fc(torch.tanh(z).mean((2, 3, 4)))

    def forward(self, x):
        return self.rest(self.conv_b(torch.tanh(self.conv_a(x))))


def _conv_reference(model, x, y, curvature):
    """h moments of ``conv_b`` and the structured moments of its input channels, sample by sample;
    patches come from convolutions with one-hot kernels, ``u`` from single-channel convolutions."""
    conv = model.conv_b
    W = conv.weight.detach()
    taps = W[0, 0].numel()
    conv_fn = {3: F.conv1d, 5: F.conv3d}[W.dim()]
    o, c_in = W.shape[:2]
    bb, wb, ww = torch.zeros(o), torch.zeros(o, c_in, taps), torch.zeros(o, c_in, taps)
    uu, su = torch.zeros(o, c_in), torch.zeros(o, c_in)
    with torch.no_grad():
        for k in range(x.shape[0]):
            a = torch.tanh(model.conv_a(x[k:k + 1]))
            z = conv(a)
            with torch.enable_grad():
                phi = _phi(model.rest, z, y[k:k + 1], curvature)[0].reshape(o, -1)
            if conv.padding_mode != "zeros":
                a = F.pad(a, [q for p in reversed(conv.padding) for q in (p, p)], mode=conv.padding_mode)
                pad = 0
            else:
                pad = conv.padding
            bb += phi.sum(1)
            for c in range(c_in):
                ch = a[:, c:c + 1]
                for t in range(taps):
                    onehot = torch.zeros(taps)
                    onehot[t] = 1
                    patch = conv_fn(ch, onehot.view(1, 1, *W.shape[2:]), None, conv.stride, pad, conv.dilation)
                    patch = patch.reshape(-1)
                    wb[:, c, t] += (phi * patch).sum(1)
                    ww[:, c, t] += (phi * patch ** 2).sum(1)
                u = conv_fn(ch, W[:, c:c + 1], None, conv.stride, pad, conv.dilation).reshape(o, -1)
                su[:, c] += (phi * u).sum(1)
                uu[:, c] += (phi * u ** 2).sum(1)
    return bb, wb.view_as(W), ww.view_as(W), su, uu


@pytest.mark.parametrize("net", [Conv1dNet, Conv3dNet])
def test_conv1d_dilated_and_conv3d_reflect_vs_loop(net):
    torch.manual_seed(13)
    model = net()
    x = torch.randn(3, 2, 9) if net is Conv1dNet else torch.randn(3, 2, 4, 5, 5)
    y = torch.randint(0, 3, (3,))
    s = pyobc.score(model, [(x, y)], "ec", granularity="weight")
    bb, wb, ww, su, uu = _conv_reference(model, x, y, "ggn")
    W = model.conv_b.weight.detach()
    score, shift = _reference(W, model.conv_b.bias, bb, wb, ww, 3)
    torch.testing.assert_close(s.by_parameter()["conv_b.weight"], score, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(s.extras["ec_shift"]["conv_b.weight"], shift, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(s.by_module()["conv_a"], 0.5 * (uu - su ** 2 / bb[:, None]).sum(0) / 3,
                               rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(s.extras["ec_channel_shift"]["conv_b"], su / bb[:, None], rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# usefulness on a trained net, options, persistence


def test_shifts_reduce_the_true_loss_change_on_a_trained_mlp():
    """On a briefly trained ReLU MLP (noisy teacher labels, more samples than parameters), removing a
    weight with its shift changes the loss less than removing it alone, for most weights.

    Only weights of live units are counted (a unit that never fires has h_bb = 0 and no shift). The
    second-order model ignores the gradient, which is not exactly zero after a few hundred Adam steps:
    where the shift is tiny, its first-order effect decides, so "most" is the right claim, not "all".
    """
    torch.manual_seed(10)
    teacher = MLP((8, 12, 3, 3))
    x = torch.randn(1024, 8) + 1.0  # inputs with a non-zero mean: compensation has work to do
    with torch.no_grad():
        y = teacher(x).argmax(1)
    y = torch.where(torch.rand(1024) < 0.2, torch.randint(0, 3, (1024,)), y)
    model = MLP((8, 16, 12, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    s = pyobc.score(model, [(x[:512], y[:512]), (x[512:], y[512:])], "ec", granularity="weight")
    theta = base_params(model)
    with torch.no_grad():
        l0 = loss_of(model, theta, x, y)
        for layer in ("fc1", "fc2"):
            w, b = theta[f"{layer}.weight"], theta[f"{layer}.bias"]
            beta = s.extras["ec_shift"][f"{layer}.weight"]
            live = (beta != 0).flatten()
            # one removed weight per variant, all variants evaluated at once
            eye = torch.eye(w.numel()).view(-1, *w.shape)[live]
            weights = w * (1 - eye)
            biases = b + (eye * beta).sum(-1)

            def change(wv, bv):
                return loss_of(model, {**theta, f"{layer}.weight": wv, f"{layer}.bias": bv}, x, y) - l0

            plain = torch.vmap(change, in_dims=(0, None))(weights, b)
            comp = torch.vmap(change)(weights, biases)
            counted, better = int(live.sum()), int((comp < plain).sum())
            total_plain, total_comp = plain.sum(), comp.sum()
            assert counted >= 0.5 * w.numel()
            assert better >= 0.6 * counted, (layer, better, counted)
            assert total_comp < 0.9 * total_plain, (layer, total_comp, total_plain)
            # pruning 30% of the layer's weights at once by score, biases shifted by the summed shifts
            scores = s.by_parameter()[f"{layer}.weight"]
            pruned = scores <= scores.flatten().kthvalue(int(0.3 * w.numel())).values
            p = dict(theta)
            p[f"{layer}.weight"] = w * ~pruned
            plain = loss_of(model, p, x, y)
            p[f"{layer}.bias"] = theta[f"{layer}.bias"] + (beta * pruned).sum(1)
            assert loss_of(model, p, x, y) < plain


def test_options_and_persistence(tmp_path):
    torch.manual_seed(11)
    model = MLP()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="curvature"):
        pyobc.score(model, [(x, y)], "ec", curvature="hessian")
    assert "ec" in pyobc.methods()
    s = pyobc.score(model, [(x, y)], "ec", granularity="weight", curvature="fisher")
    path = tmp_path / "ec.pt"
    s.save(path)
    back = pyobc.Scores.load(path)  # extras must load with weights_only=True
    for k, v in s.extras["ec_shift"].items():
        assert torch.equal(back.extras["ec_shift"][k], v)
    assert back.extras["ec_curvature"] == "fisher"
    # the empirical Fisher differs from the Gauss-Newton curvature
    g = pyobc.score(model, [(x, y)], "ec", granularity="weight")
    assert not torch.allclose(g.by_parameter()["fc1.weight"], s.by_parameter()["fc1.weight"])


def test_ggn_curvature_refuses_large_outputs_before_paying_for_them():
    """One backward per output element of a sample: a (tokens x vocabulary) output is refused with the way
    out, and max_outputs raises the limit (the scores then equal a run with the default on a small output)."""
    from pyobc.criteria.ec import ECCostError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
    seq = [(torch.randn(3, 7, 4), torch.randint(0, 5, (3, 7)))]

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x).reshape(-1, 5), y.reshape(-1))

    with pytest.raises(ECCostError, match=r"35 here.*max_outputs=16.*curvature='fisher'"):
        pyobc.score(model, seq, "ec", loss_fn=loss_fn, max_outputs=16)
    with pytest.raises(ValueError, match="max_outputs"):
        pyobc.score(model, seq, "ec", loss_fn=loss_fn, max_outputs=0)
    assert pyobc.score(model, seq, "ec", loss_fn=loss_fn).values  # 35 <= 1024: computed
    assert pyobc.score(model, seq, "ec", loss_fn=loss_fn, curvature="fisher").values
