"""Tests for pyobc.models (builders, registry, train/evaluate, cached digits-trained models)."""
from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

from pyobc import models

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["mlp", "resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "vgg19", "vit_tiny"]
# (in_channels, input_size, num_classes, width)
COMBOS = [(1, 8, 10, 0.25), (3, 16, 7, 0.5), (3, 32, 10, 0.25), (1, 8, 2, 1.0)]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert models.names() == sorted(ALL)
    with pytest.raises(ValueError) as err:
        models.get("resnet18")
    for name in ALL:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels, input_size, num_classes, width", COMBOS)
def test_forward_backward(name, in_channels, input_size, num_classes, width):
    torch.manual_seed(0)
    model = models.get(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size, width=width)
    x = torch.randn(3, in_channels, input_size, input_size)
    out = model(x)
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, num_classes)


@pytest.mark.parametrize("name", ALL)
def test_no_inplace_ops(name):
    """No module is in-place and no module output is modified after it was produced."""
    model = models.get(name, in_channels=1, input_size=16, width=0.25)
    for m in model.modules():
        assert not getattr(m, "inplace", False), m
    seen = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            seen.append((module, output, output._version))
        elif isinstance(output, tuple):
            seen.extend((module, o, o._version) for o in output if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    model(torch.randn(2, 1, 16, 16))
    for h in handles:
        h.remove()
    assert seen
    for module, tensor, version in seen:
        assert tensor._version == version, f"output of {module} was modified in place"


def test_parameter_counts():
    # He et al. report 0.27M (ResNet-20) and 0.85M (ResNet-56) with identity shortcuts; the
    # projection shortcuts here add 2.7k parameters.
    n20 = _count(models.resnet20(num_classes=10, in_channels=3))
    n32 = _count(models.resnet32(num_classes=10, in_channels=3))
    n56 = _count(models.resnet56(num_classes=10, in_channels=3))
    assert abs(n20 - 0.27e6) / 0.27e6 < 0.02, n20
    assert abs(n32 - 0.46e6) / 0.46e6 < 0.03, n32
    assert abs(n56 - 0.85e6) / 0.85e6 < 0.02, n56
    assert n20 == 272_474 and n56 == 855_770
    # VGG-16-BN, CIFAR head (512-512-10): about 15.0M
    assert abs(_count(models.vgg16()) - 14.99e6) / 14.99e6 < 0.01
    # width multiplier scales channels
    assert _count(models.resnet20(width=0.5)) < n20 / 3
    assert models.mlp(in_channels=1, input_size=8).layers[0].in_features == 64


def test_resnet_structure():
    model = models.resnet20(in_channels=1, input_size=16)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert model.conv1.out_channels == 16 and model.fc.in_features == 64
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    proj = model.layer2[0].shortcut
    assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer3[0].conv1.stride == (2, 2)
    assert len(models.resnet56().layer3) == 9


def test_vgg_pooling_adapts_to_input_size():
    def pools(size):
        return sum(isinstance(m, nn.MaxPool2d) for m in models.vgg11(input_size=size, width=0.125).modules())

    assert pools(32) == 5 and pools(16) == 4 and pools(8) == 3
    convs = [m for m in models.vgg16().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and convs[-1].out_channels == 512
    assert len([m for m in models.vgg19(width=0.125).modules() if isinstance(m, nn.Conv2d)]) == 16
    head = models.vgg11(width=0.5).classifier
    assert head[0].in_features == 256 and head[0].out_features == 256


def test_vit_structure():
    model = models.vit_tiny(input_size=32)
    assert model.patch_size == 4 and model.num_patches == 64
    assert models.vit_tiny(input_size=16).num_patches == 16
    assert models.vit_tiny(input_size=8).num_patches >= 4
    assert len(model.blocks) == 4 and model.blocks[0].attn.batch_first
    assert models.vit_tiny(input_size=16, patch_size=8).num_patches == 4
    with pytest.raises(ValueError, match="patch_size"):
        models.vit_tiny(input_size=16, patch_size=5)
    with pytest.raises(ValueError, match="num_heads"):
        models.vit_tiny(embed_dim=30, num_heads=4)


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        models.get("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="width"):
        models.get("vgg11", width=-1)
    with pytest.raises(ValueError, match="hidden"):
        models.mlp(hidden=(0,))


@pytest.mark.parametrize("name", ALL)
def test_torch_pruning_traces(name):
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = models.get(name, in_channels=3, input_size=16, width=0.25)
    example = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ViT: "unwrapped parameters" notice for cls/pos tokens
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = list(dg.get_all_groups())
    assert len(groups) > 0
    if name == "vit_tiny":
        unwrapped = [(model.cls_token, 2), (model.pos_embed, 2)]
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, unwrapped_parameters=unwrapped)
        assert len(list(dg.get_all_groups())) > 0


# ----------------------------------------------------------------------------- train / evaluate

def _toy_loader(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_train_and_evaluate_generic():
    torch.manual_seed(0)
    model = models.mlp(num_classes=2, in_channels=1, input_size=4, hidden=(16,))
    loader = _toy_loader()
    before = models.evaluate(model, loader)
    model.train()
    history = models.train(model, loader, epochs=5, lr=0.1, weight_decay=1e-4, progress=False)
    assert len(history) == 5 and history[-1] < history[0]
    assert model.training  # mode restored
    after = models.evaluate(model, loader)
    assert isinstance(after, float) and 0.0 <= after <= 1.0
    assert model.training  # evaluate restores the mode too
    assert after > max(before, 0.8)
    assert models.train(model, loader, epochs=0, lr=0.1) == []


def test_train_param_groups_and_options():
    torch.manual_seed(0)
    model = models.mlp(num_classes=2, in_channels=1, input_size=4, hidden=(8,))
    frozen = model.layers[0].weight.detach().clone()
    groups = [{"params": list(model.layers[2].parameters()), "lr": 0.05}]
    models.train(model, _toy_loader(), epochs=1, lr=0.1, weight_decay=0.0, param_groups=groups,
                 optimizer="adamw", schedule="linear", warmup=0.2, max_grad_norm=1.0,
                 augment=models.RandomShift(1, seed=0), label_smoothing=0.1)
    assert torch.equal(frozen, model.layers[0].weight)
    with pytest.raises(ValueError, match="optimizer"):
        models.train(model, _toy_loader(), epochs=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule"):
        models.train(model, _toy_loader(), epochs=1, lr=0.1, schedule="step")


def test_random_shift():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = models.RandomShift(1, seed=0)(x)
    assert out.shape == x.shape
    assert torch.equal(out, models.RandomShift(1, seed=0)(x))
    assert torch.equal(models.RandomShift(0)(x), x)


# ------------------------------------------------------------------------ trained() and its cache

TINY = dict(name="mlp", image_size=8, channels=1, epochs=1, seed=0, progress=False, hidden=(32,))


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trained_caches_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOBC_CACHE", str(tmp_path))
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()

    first = models.trained(**TINY)
    assert torch.equal(rng, torch.get_rng_state())  # global state untouched
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert not first.training
    info = models.trained_info(first)
    assert info is first.trained_info and not info.from_cache
    assert first.test_accuracy == info.test_accuracy and 0.5 < info.test_accuracy <= 1.0
    assert info.zoo_version == models.ZOO_VERSION and info.config["recipe"]["epochs"] == 1
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1 and str(files[0]) == info.path
    blob = torch.load(files[0], weights_only=True)
    assert blob["zoo_version"] == models.ZOO_VERSION and blob["test_accuracy"] == info.test_accuracy

    start = time.perf_counter()
    second = models.trained(**TINY)
    assert time.perf_counter() - start < 2.0
    assert second.trained_info.from_cache and not second.training
    assert second.test_accuracy == first.test_accuracy
    assert _state_equal(first, second)

    # a different config is a different cache entry
    other = models.trained(**{**TINY, "seed": 1})
    assert not other.trained_info.from_cache and other.trained_info.path != info.path
    assert len(list(tmp_path.rglob("*.pt"))) == 2

    # explicit cache_dir wins over $PYOBC_CACHE
    elsewhere = tmp_path / "elsewhere"
    models.trained(**TINY, cache_dir=elsewhere)
    assert len(list(elsewhere.rglob("*.pt"))) == 1


def test_trained_num_threads_is_restored(tmp_path):
    torch.set_num_threads(2)
    try:
        model = models.trained(**TINY, cache_dir=tmp_path, num_threads=1)
        assert torch.get_num_threads() == 2
        assert not model.trained_info.from_cache
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError, match="num_threads"):
        models.trained(**TINY, cache_dir=tmp_path, num_threads=0)


def test_trained_is_deterministic(tmp_path):
    a = models.trained(**TINY, cache_dir=tmp_path / "a")
    torch.manual_seed(1234)  # the global seed must not matter
    b = models.trained(**TINY, cache_dir=tmp_path / "b")
    assert not b.trained_info.from_cache
    assert _state_equal(a, b) and a.test_accuracy == b.test_accuracy


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_content", "wrong_shapes"])
def test_trained_recovers_from_bad_cache(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("PYOBC_CACHE", str(tmp_path))
    good = models.trained(**TINY)
    path = good.trained_info.path
    raw = open(path, "rb").read()
    if damage == "garbage":
        open(path, "wb").write(b"this is not a torch file")
    elif damage == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif damage == "empty":
        open(path, "wb").write(b"")
    elif damage == "wrong_content":
        torch.save({"hello": torch.zeros(3)}, path)
    else:
        blob = torch.load(path, weights_only=True)
        blob["state_dict"] = {k: torch.zeros(1) for k in blob["state_dict"]}
        torch.save(blob, path)
    again = models.trained(**TINY)
    assert not again.trained_info.from_cache
    assert _state_equal(good, again)
    # the file was overwritten with a good one
    third = models.trained(**TINY)
    assert third.trained_info.from_cache and _state_equal(good, third)


def test_trained_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        models.trained("resnet18", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        models.trained("mlp", image_size=12, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="channels"):
        models.trained("mlp", channels=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        models.trained("mlp", image_size=16.0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="in_channels"):
        models.trained("mlp", in_channels=3, cache_dir=tmp_path)
    with pytest.raises(ValueError):
        models.trained_info(nn.Linear(2, 2))
    assert not list(tmp_path.rglob("*.pt"))
