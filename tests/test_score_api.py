"""pyobc.score as an API: the user's model is left alone, mistakes give clear errors, results persist."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 4))


def data(n=16, batches=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(batches)]


ALL_DATA_METHODS = ["taylor", "jacobian", "obd"]


@pytest.mark.parametrize("method", ["magnitude"] + ALL_DATA_METHODS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_model_untouched(method, train_mode):
    model = small_cnn()
    model.train(train_mode)
    model[4].eval()  # a mixed-mode model must come back mixed
    # existing .grad values must survive scoring unchanged
    F.cross_entropy(model(data()[0][0]), data()[0][1]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    pyobc.score(model, data(), method)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN running stats included
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_scores_shapes_and_views():
    model = small_cnn()
    s = pyobc.score(model, data(), "jacobian")
    bm = s.by_module()
    assert set(bm) == {"0", "3"}
    assert bm["0"].shape == (6,) and bm["3"].shape == (8,)
    assert s.batches == 2 and s.samples == 32
    assert all(torch.isfinite(v).all() for v in bm.values())
    text = repr(s)
    assert "jacobian" in text and "groups=2" in text and "2 batches" in text
    with pytest.raises(ValueError, match="granularity='weight'"):
        s.by_parameter()
    ranking = s.ranking()
    assert len(ranking) == 14 and ranking[0][2] <= ranking[-1][2]


def test_save_load_weights_only(tmp_path):
    model = small_cnn()
    s = pyobc.score(model, data(), "taylor", granularity="weight")
    path = tmp_path / "s.pt"
    s.save(path)
    raw = torch.load(path, weights_only=True)  # must not need pickle of arbitrary objects
    assert raw["method"] == "taylor"
    t = pyobc.Scores.load(path)
    for k, v in s.by_module().items():
        assert torch.equal(t.by_module()[k], v)
    for k, v in s.by_parameter().items():
        assert torch.equal(t.by_parameter()[k], v)
    assert [m.module for m in t.groups[0].members] == [m.module for m in s.groups[0].members]
    with pytest.raises(ValueError, match="not a pyobc scores file"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        pyobc.Scores.load(tmp_path / "bad.pt")


def test_methods_listing():
    listing = pyobc.methods()
    for name in ["magnitude", "taylor", "obd", "jacobian"]:
        assert name in listing and isinstance(listing[name], str) and listing[name]


def test_unknown_method_and_options():
    with pytest.raises(ValueError, match="unknown method 'nope'.*available"):
        pyobc.score(small_cnn(), data(), "nope")
    with pytest.raises(TypeError, match="unexpected option"):
        pyobc.score(small_cnn(), data(), "jacobian", bogus=1)
    with pytest.raises(ValueError, match="rows"):
        pyobc.score(small_cnn(), data(), "jacobian", rows="everything")
    with pytest.raises(ValueError, match="p="):
        pyobc.score(small_cnn(), data(), "magnitude", p=3)


def test_granularity_errors():
    with pytest.raises(ValueError, match="does not support granularity='weight'"):
        pyobc.score(small_cnn(), data(), "jacobian", granularity="weight")
    with pytest.raises(ValueError, match="granularity must be"):
        pyobc.score(small_cnn(), data(), "taylor", granularity="block")


def test_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        pyobc.score(small_cnn(), [], "taylor")


def test_not_a_loader_and_not_a_model():
    with pytest.raises(TypeError, match="iterable"):
        pyobc.score(small_cnn(), 42, "taylor")
    with pytest.raises(TypeError, match="nn.Module"):
        pyobc.score("resnet", data(), "taylor")


def test_garbage_collector_state_is_restored():
    """Scoring pauses automatic collection per batch (pyobc.scoring.collector): enabled stays enabled,
    also after an error mid-batch, and a collector the caller disabled stays disabled."""
    import gc

    seen = []

    def loss_fn(model, batch):
        seen.append(gc.isenabled())
        return F.cross_entropy(model(batch[0]), batch[1])

    assert gc.isenabled()
    pyobc.score(small_cnn(), data(), "taylor", loss_fn=loss_fn)
    assert gc.isenabled() and False in seen  # off during the updates, back on after

    def failing(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1]) * math.nan

    with pytest.raises(FloatingPointError):
        pyobc.score(small_cnn(), data(), "taylor", loss_fn=failing)
    assert gc.isenabled()
    gc.disable()
    try:
        pyobc.score(small_cnn(), data(), "taylor")
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss(bad):
    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y) * bad

    with pytest.raises(FloatingPointError, match="batch 0"):
        pyobc.score(small_cnn(), data(), "jacobian", loss_fn=loss_fn)


def test_data_on_other_device():
    batches = [(x.to("meta"), y.to("meta")) for x, y in data()]
    with pytest.raises(ValueError, match="meta.*model is on cpu"):
        pyobc.score(small_cnn(), batches, "taylor", example_inputs=torch.randn(2, 1, 6, 6))


def test_no_prunable_layer():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)  # only the output layer: nothing may be pruned

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="no prunable layer"):
        pyobc.score(Scale(), [(torch.randn(4, 4), torch.randint(0, 3, (4,)))], "taylor")


def test_needs_data_or_inputs():
    with pytest.raises(ValueError, match="needs data"):
        pyobc.score(small_cnn(), None, "taylor")
    with pytest.raises(ValueError, match="example_inputs"):
        pyobc.score(small_cnn(), None, "magnitude")


def test_custom_batches_and_loss_fn():
    """Dict batches with a loss_fn; example inputs are found by watching the model's call."""
    model = small_cnn()
    batches = [{"image": x, "label": y} for x, y in data()]

    def loss_fn(m, b):
        return F.cross_entropy(m(b["image"]), b["label"])

    s = pyobc.score(model, batches, "jacobian", loss_fn=loss_fn)
    ref = pyobc.score(model, data(), "jacobian")
    for k, v in ref.by_module().items():
        torch.testing.assert_close(s.by_module()[k], v)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pairs"):
        pyobc.score(model, batches, "jacobian")


def test_max_batches_and_progress_bar(capsys):
    model = small_cnn()
    s = pyobc.score(model, data(batches=5), "taylor", max_batches=2, progress=True)
    assert s.batches == 2
    with pytest.raises(ValueError, match="max_batches"):
        pyobc.score(model, data(), "taylor", max_batches=0)


def test_inplace_activations_are_handled():
    """In-place ReLU after BatchNorm overwrites the BN output pyobc records: results must not change."""
    torch.manual_seed(0)

    def net(inplace):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    for method, kw in [("obd", {}), ("jacobian", {"rows": "sample"})]:
        a = pyobc.score(net(False), data(), method, **kw).by_module()
        b = pyobc.score(net(True), data(), method, **kw).by_module()
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=f"{method} {k}")


def test_wrapped_models_are_unwrapped():
    model = small_cnn()
    wrapped = nn.DataParallel(model)
    a = pyobc.score(wrapped, data(), "taylor").by_module()
    b = pyobc.score(model, data(), "taylor").by_module()
    assert a.keys() == b.keys()


def test_device_argument_copies_model():
    model = small_cnn()
    s = pyobc.score(model, data(), "taylor", device="cpu")
    assert set(s.by_module()) == {"0", "3"}


def test_ignored_layers():
    model = small_cnn()
    s = pyobc.score(model, data(), "taylor", ignored_layers=["3"])
    assert set(s.by_module()) == {"0"}
    with pytest.raises(ValueError, match="no submodule"):
        pyobc.score(model, data(), "taylor", ignored_layers=["nope"])


class _Output(dict):
    """A dict with attribute access, as Hugging Face's ``ModelOutput``."""

    __getattr__ = dict.get


class _Wrapped(nn.Module):
    """``net`` whose output is wrapped the way Hugging Face classifiers (``.logits``) or dict models return it."""

    def __init__(self, net: nn.Module, how: str):
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x):
        z = self.net(x)
        if self.how == "dict":
            return {"logits": z}
        if self.how == "tuple":
            return z, z
        return _Output(logits=z, hidden_states=None)


@pytest.mark.parametrize("how", ["attribute", "dict"])
def test_default_loss_reads_logits_of_wrapped_outputs(how):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    data = [(torch.randn(8, 6), torch.randint(0, 5, (8,)))]
    plain = pyobc.score(net, data, "taylor")
    wrapped = pyobc.score(_Wrapped(net, how), data, "taylor")
    assert [g.root for g in wrapped.groups] == ["net." + g.root for g in plain.groups]
    for a, b in zip(plain.values, wrapped.values):
        torch.testing.assert_close(a, b)


def test_default_loss_refuses_ambiguous_tuple_outputs():
    net = _Wrapped(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)), "tuple")
    with pytest.raises(TypeError, match=r"must return logits.*got tuple"):
        pyobc.score(net, [(torch.randn(8, 6), torch.randint(0, 5, (8,)))], "taylor")


class _Keywords(nn.Module):
    """A classifier called with keywords, as Hugging Face models are (``pixel_values=``, ``attention_mask=``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values, attention_mask=None):
        z = self.net(pixel_values if attention_mask is None else pixel_values * attention_mask)
        return _Output(logits=z)


def test_default_loss_takes_dict_batches_with_labels():
    """``{"pixel_values", "attention_mask", "labels"}`` batches score like ``(inputs, targets)`` pairs of the
    same data, for every kind of pass (first order, per-sample, second order)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    x, y, mask = torch.randn(8, 6), torch.randint(0, 5, (8,)), (torch.rand(8, 6) > 0.2).float()
    model = _Keywords(net)
    for method in ("taylor", "obd", "oba"):
        pairs = pyobc.score(net, [(x * mask, y)], method)
        dicts = pyobc.score(model, [{"pixel_values": x, "attention_mask": mask, "labels": y}], method)
        for a, b in zip(pairs.values, dicts.values):
            torch.testing.assert_close(a, b, msg=method)


def test_default_loss_names_the_keys_of_an_unlabelled_dict():
    model = _Keywords(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)))
    with pytest.raises(TypeError, match=r"dicts with a 'labels' entry .*got dict with keys \['pixel_values'\]"):
        pyobc.score(model, [{"pixel_values": torch.randn(4, 6)}], "taylor")
