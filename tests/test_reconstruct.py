"""Layer-wise reconstruction (``pyobc.prune(..., reconstruct=...)``): every refit is checked against an
independent least-squares solution (``torch.linalg.lstsq`` on inputs gathered by hand, conv patches cut out
with explicit slicing instead of ``unfold``), exact recovery when the removed inputs are affine in the kept
ones, brute-force calibration errors, and brute-force OBS errors (remove one channel, refit, measure)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
from pyobc.layers import BATCH_NORMS
from pyobc.pruning.reconstruct import Calibration, obs_scores
from prune_testing import assert_consistent, build, inputs, state_equal

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(hidden=8, act=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), act(), nn.Linear(hidden, 3)).double().eval()


def _magnitude(net, x):
    return pyobc.score(net, None, "magnitude", example_inputs=x[:2])


def test_exact_when_removed_inputs_are_affine_in_kept_ones():
    # no nonlinearity: every hidden unit is affine in the 4 inputs, so with 4 (independent) kept hidden units
    # the removed ones are affine combinations of the kept ones; 5 samples = 4 kept inputs + the intercept
    net = _mlp(act=nn.Identity)
    x = torch.randn(5, 4, dtype=torch.float64)
    small, report = pyobc.prune(net, _magnitude(net, x), 0.5, scope="local", reconstruct=[x], damping=0.0)
    assert small[2].in_features == 4 and report.reconstruction.layers[0].refit
    fresh = torch.randn(50, 4, dtype=torch.float64) * 3
    torch.testing.assert_close(small(fresh), net(fresh), rtol=1e-7, atol=1e-7)
    plain, _ = pyobc.prune(net, _magnitude(net, x), 0.5, scope="local")
    assert (plain(fresh) - net(fresh)).abs().max() > 1e-2  # without the refit the output is wrong


def _hidden(net, x):
    return net[1](net[0](x))


def test_closed_form_equals_lstsq():
    net = _mlp(hidden=10)
    batches = [(torch.randn(40, 4, dtype=torch.float64), 0) for _ in range(3)]
    small, report = pyobc.prune(net, _magnitude(net, batches[0][0]), 0.4, scope="local", reconstruct=batches,
                                damping=0.0)
    kept = report.layers[0].kept
    x = torch.cat([b[0] for b in batches])
    removed = report.removed["0"]
    keep = torch.tensor([c for c in range(10) if c not in removed.tolist()])
    assert keep.numel() == kept
    a = torch.cat([_hidden(net, x)[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, net(x)).solution.T  # (outputs, kept + 1)
    torch.testing.assert_close(small[2].weight, sol[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(small[2].bias, sol[:, -1], rtol=1e-6, atol=1e-8)
    fit = report.reconstruction.layers[0]
    assert fit.samples == 120 and fit.inputs == kept
    brute = ((a @ sol.T - net(x)) ** 2).sum(1).mean()
    assert fit.error_after == pytest.approx(float(brute.detach()), rel=1e-6, abs=1e-10)


def _patches(x, k, stride, pad):
    """(N*L, C*k*k) input patches cut with explicit slicing (independent of F.unfold)."""
    x = F.pad(x, (pad, pad, pad, pad))
    n, c, h, w = x.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            rows.append(x[:, :, i * stride:i * stride + k, j * stride:j * stride + k].reshape(n, -1))
    return torch.stack(rows, 1).reshape(n * oh * ow, -1)  # sample-major, then positions


def test_conv_refit_equals_unfolded_linear_refit():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1)).double()
    x = torch.randn(12, 2, 6, 6, dtype=torch.float64)
    scores = _magnitude(net, x)
    small, report = pyobc.prune(net, scores, 0.5, scope="local", reconstruct=[x], damping=0.0)
    keep = torch.tensor([c for c in range(6) if c not in report.removed["0"].tolist()])
    h = net[1](net[0](x))[:, keep]
    a = torch.cat([_patches(h, 3, 2, 1), torch.ones(12 * 9, 1, dtype=torch.float64)], 1)
    y = net(x).permute(0, 2, 3, 1).reshape(-1, 4)
    sol = torch.linalg.lstsq(a, y).solution.T
    torch.testing.assert_close(small[2].weight.reshape(4, -1), sol[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(small[2].bias, sol[:, -1], rtol=1e-6, atol=1e-8)


def _io(model, name, x):
    rec = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: rec.update(x=a[0], y=o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return rec["x"], rec["y"]


def _sliced(dense_layer, pruned_layer, keep_in, keep_out):
    w = dense_layer.weight.detach()[keep_out][:, keep_in]
    assert w.shape == pruned_layer.weight.shape
    return w


def _keep(report, groups, name, kind, size):
    alive = torch.ones(size, dtype=torch.bool)
    for g in groups:
        removed = report.removed.get(g.root)
        if removed is None:
            continue
        mask = torch.zeros(g.size, dtype=torch.bool)
        mask[removed] = True
        for m in g.members:
            if m.module == name and m.kind == kind:
                alive[m.index[mask[m.root]]] = False
    return alive.nonzero().reshape(-1)


@pytest.mark.parametrize("damping", [1e-6, 0.01, 10.0])
def test_refit_never_increases_the_calibration_error(damping):
    model = build("resnet20")
    x = inputs(48, seed=5)
    scores = pyobc.score(model, [(x, torch.randint(0, 10, (48,)))], "taylor")
    small, report = pyobc.prune(model, scores, 0.4, reconstruct=[x], damping=damping)
    assert_consistent(small)
    assert report.reconstruction.layers
    for fit in report.reconstruction.layers:
        dense_layer = model.get_submodule(fit.name)
        layer = small.get_submodule(fit.name)
        # inputs of the final pruned model = the inputs at fit time (layers are refit in forward order)
        xh, yh = _io(small, fit.name, x)
        _, y = _io(model, fit.name, x)
        keep_out = _keep(report, scores.groups, fit.name, "out", dense_layer.weight.shape[0])
        keep_in = _keep(report, scores.groups, fit.name, "in", dense_layer.weight.shape[1])
        y = y[:, keep_out]
        with torch.no_grad():
            w = _sliced(dense_layer, layer, keep_in, keep_out)
            b = None if dense_layer.bias is None else dense_layer.bias[keep_out]
            plain = F.linear(xh, w, b) if fit.name == "fc" else F.conv2d(xh, w, b, layer.stride, layer.padding)
        err_after = float(((yh - y) ** 2).sum(1).mean())  # per sample (and output position)
        err_before = float(((plain - y) ** 2).sum(1).mean())
        assert err_after <= err_before * (1 + 1e-5) + 1e-7, fit.name
        assert fit.error_after == pytest.approx(err_after, rel=1e-3, abs=1e-6), fit.name
        assert fit.error_before == pytest.approx(err_before, rel=1e-3, abs=1e-6), fit.name
    if damping < 1e-3:
        assert all(fit.refit for fit in report.reconstruction.layers)


def test_batchnorm_statistics_kept_and_user_model_untouched():
    model = build("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    x = inputs(32, seed=2)
    scores = pyobc.score(model, None, "magnitude", example_inputs=x[:2])
    small, report = pyobc.prune(model, scores, 0.5, scope="local", reconstruct=[x])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [m.training for m in model.modules()]
    assert [m.training for m in small.modules()] == flags
    for name, m in small.named_modules():
        if isinstance(m, BATCH_NORMS):
            keep = _keep(report, scores.groups, name, "norm", model.get_submodule(name).num_features)
            torch.testing.assert_close(m.running_mean, model.get_submodule(name).running_mean[keep])
            torch.testing.assert_close(m.running_var, model.get_submodule(name).running_var[keep])


def test_obs_error_equals_brute_force_refit():
    net = _mlp(hidden=6, seed=1)
    x = torch.randn(80, 4, dtype=torch.float64)
    obs = obs_scores(net, _magnitude(net, x), Calibration([x]), selection="obs", damping=0.0)
    with torch.no_grad():
        h, y = _hidden(net, x), net(x)
    energy = float((y ** 2).sum(1).mean())  # the dense output energy, bias included
    for c in range(6):
        keep = [k for k in range(6) if k != c]
        a = torch.cat([h[:, keep], torch.ones(80, 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, y).solution
        err = float(((a @ sol - y) ** 2).sum(1).mean())
        assert float(obs.values[0][c]) == pytest.approx(err / energy, rel=1e-6, abs=1e-12)
    both = obs_scores(net, _magnitude(net, x), Calibration([x]), selection="scores*obs", damping=0.0)
    assert both.method == "magnitude*obs" and bool((both.values[0] <= _magnitude(net, x).values[0] + 1e-9).all())


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_equivalent_prune_starts_from_the_reconstructed_model(name):
    model = build(name)
    x = inputs(32, seed=3)
    scores = pyobc.score(model, None, "magnitude", example_inputs=x[:2])
    kw = dict(scope="local", reconstruct=[x], damping=0.01)
    naive, _ = pyobc.prune(model, scores, 0.5, **kw)
    adapted = pyobc.equivalent_prune(model, scores, 0.5, **kw)
    assert pyobc.adapter_parameters(adapted)
    probe = inputs(8, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(adapted(probe), naive(probe), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pyobc.fold(adapted)(probe), naive(probe), rtol=1e-4, atol=1e-4)
        plain = pyobc.equivalent_prune(model, scores, 0.5, scope="local")
        assert not torch.allclose(plain(probe), naive(probe), atol=1e-3)


def test_pruner_reconstructs_every_step():
    model = build("vgg11")
    x = inputs(32, seed=4)
    data = [(x, torch.randint(0, 10, (32,)))]
    pruner = pyobc.Pruner(model, data, "taylor", steps=1, ratio=0.4, reconstruct=data)
    small, reports = pruner.run()
    assert reports[0].reconstruction is not None and reports[0].reconstruction.layers
    scores = pyobc.score(model, data, "taylor")
    one, _ = pyobc.prune(model, scores, 0.4, reconstruct=data)
    assert state_equal(small, one)
    two, reports = pyobc.Pruner(model, data, "taylor", steps=2, ratio=0.4, reconstruct=data).run()
    assert all(r.reconstruction is not None for r in reports)
    assert two(x).shape == (32, 10)


def test_loss_fn_contract_matches_pairs():
    model = build("vgg11")
    x = inputs(16, seed=6)
    scores = pyobc.score(model, None, "magnitude", example_inputs=x[:2])
    a, _ = pyobc.prune(model, scores, 0.3, scope="local", reconstruct=[(x, None)])
    b, _ = pyobc.prune(model, scores, 0.3, scope="local", reconstruct=[{"image": x}],
                       reconstruct_loss_fn=lambda m, batch: m(batch["image"]).sum())
    assert state_equal(a, b)


def test_clear_errors():
    net = _mlp()
    x = torch.randn(8, 4, dtype=torch.float64)
    s = _magnitude(net, x)
    with pytest.raises(ValueError, match="needs calibration data"):
        pyobc.prune(net, s, 0.3, selection="obs")
    with pytest.raises(ValueError, match="selection must be one of"):
        pyobc.prune(net, s, 0.3, reconstruct=[x], selection="best")
    with pytest.raises(ValueError, match="damping"):
        pyobc.prune(net, s, 0.3, reconstruct=[x], damping=-1.0)
    with pytest.raises(ValueError, match="no batch"):
        pyobc.prune(net, s, 0.3, reconstruct=[])
    with pytest.raises(TypeError, match="reconstruct_loss_fn"):
        pyobc.prune(net, s, 0.3, reconstruct=[{"x": x}])
    with pytest.raises(ValueError, match="singular"):  # 2 samples for 6 kept inputs, no damping
        pyobc.prune(net, s, 0.25, scope="local", reconstruct=[x[:2]], damping=0.0)
    grouped = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                            nn.Linear(4, 2)).eval()
    xi = torch.randn(4, 1, 3, 3)
    sg = pyobc.score(grouped, None, "magnitude", example_inputs=xi[:2])
    with pytest.raises(NotImplementedError, match="grouped"):
        pyobc.prune(grouped, sg, 0.5, scope="local", reconstruct=[xi], ignored_layers=["2"])


def test_compare_reports_reconstructed_accuracy(tmp_path):
    from pyobc.compare import run_compare, write_table

    model = build("vgg11")
    x = inputs(32, seed=7)
    data = [(x, model(x).argmax(1).detach())]  # labels the dense model gets right: accuracy 1 unpruned
    result = run_compare(model, data, data, ["magnitude"], [0.5], example_inputs=x[:2], reconstruct=True,
                         damping=0.01)
    row = result.rows[0]
    assert result.baseline_accuracy == 1.0 and row.reconstructed_accuracy is not None
    small, _ = pyobc.prune(model, pyobc.score(model, data, "magnitude"), 0.5, scope="local", target="macs",
                           example_inputs=x[:2], reconstruct=data)
    assert row.reconstructed_accuracy == pytest.approx(float((small(x).argmax(1) == data[0][1]).float().mean()))
    write_table(result, tmp_path / "t.csv")
    assert "reconstructed_accuracy" in (tmp_path / "t.csv").read_text().splitlines()[0]


def test_conv1d_refit_equals_patch_lstsq():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.Tanh(), nn.Conv1d(5, 3, 3, stride=2, dilation=2,
                                                                              padding=2)).double()
    x = torch.randn(10, 2, 9, dtype=torch.float64)
    small, report = pyobc.prune(net, _magnitude(net, x), 0.4, scope="local", reconstruct=[x], damping=0.0)
    keep = torch.tensor([c for c in range(5) if c not in report.removed["0"].tolist()])
    with torch.no_grad():
        h = F.pad(net[1](net[0](x))[:, keep], (2, 2))
        y = net(x)
    positions = range(y.shape[2])
    # output position j reads padded inputs 2j, 2j+2, 2j+4 (stride 2, dilation 2)
    patches = torch.stack([h[:, :, 2 * j:2 * j + 5:2].reshape(10, -1) for j in positions], 1).reshape(-1, 3 * 3)
    a = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, y.permute(0, 2, 1).reshape(-1, 3)).solution.T
    torch.testing.assert_close(small[2].weight.reshape(3, -1), sol[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(small[2].bias, sol[:, -1], rtol=1e-6, atol=1e-8)


def test_attention_layers_are_named_as_not_refit():
    model = build("vit_tiny")
    x = inputs(32, seed=1)
    scores = pyobc.score(model, None, "magnitude", example_inputs=x[:2])
    small, report = pyobc.prune(model, scores, 0.3, scope="local", reconstruct=[x])
    rec = report.reconstruction
    assert {f.name for f in rec.layers} >= {"blocks.0.fc2", "blocks.1.fc2", "head"}
    assert rec.skipped == sorted(n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
    assert "not refit" in str(report)
    with torch.no_grad():
        assert small(x).shape == (32, 10)
