"""Tests for pyobc.datasets (the shipped UCI digits)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pyobc import datasets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_sizes_disjoint_and_complete():
    train = datasets.split_indices("train")
    test = datasets.split_indices("test")
    assert len(train) + len(test) == 1797
    assert len(train) == 1438 and len(test) == 359
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))


def test_split_is_stratified():
    _, y_train = datasets.digits_tensors("train")
    _, y_test = datasets.digits_tensors("test")
    n_train = torch.bincount(y_train, minlength=10)
    n_test = torch.bincount(y_test, minlength=10)
    assert (n_train > 0).all() and (n_test > 0).all()
    frac = n_test.double() / (n_train + n_test).double()
    # each class: round(0.2 * class size) test images
    assert torch.all((frac - 0.2).abs() < 0.01), frac
    expected = ((n_train + n_test).double() * 0.2 + 0.5).floor().long()
    assert torch.equal(n_test, expected)


def test_split_is_fixed():
    # first indices of the published split; guards against accidental changes across versions
    test = datasets.split_indices("test")
    assert test.dtype.kind == "i"
    assert test[:10].tolist() == [5, 7, 19, 29, 35, 55, 60, 65, 66, 70]
    digest = hashlib.sha256(test.astype("<i8").tobytes()).hexdigest()
    assert digest == "76bdcafe6812af7a4b256e3b96977e961d7f6580918ebc0699190248652e8c9a"
    # the split never looks at torch's or numpy's global RNG
    torch.manual_seed(123)
    np.random.seed(123)
    a = datasets.split_indices("test")
    torch.manual_seed(7)
    np.random.seed(7)
    assert np.array_equal(a, datasets.split_indices("test"))


def test_normalisation_constants_match_train_split():
    x_raw = np.load(Path(datasets.__file__).parent / "data" / "digits.npz")["x"]
    pixels = x_raw[datasets.split_indices("train")].astype(np.float64) / 16.0
    assert abs(pixels.mean() - datasets.MEAN) < 1e-9
    assert abs(pixels.std() - datasets.STD) < 1e-9
    x, _ = datasets.digits_tensors("train", image_size=8, channels=1)
    assert abs(float(x.double().mean())) < 1e-5
    assert abs(float(x.double().std(unbiased=False)) - 1.0) < 1e-4


@pytest.mark.parametrize("image_size", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(image_size, channels):
    for split, n in (("train", 1438), ("test", 359)):
        x, y = datasets.digits_tensors(split, image_size=image_size, channels=channels)
        assert x.shape == (n, channels, image_size, image_size)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert y.shape == (n,) and int(y.min()) == 0 and int(y.max()) == 9
        assert torch.isfinite(x).all()
        if channels == 3:
            assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    loader = datasets.digits("test", batch_size=50, image_size=image_size, channels=channels)
    xb, yb = next(iter(loader))
    assert xb.shape == (50, channels, image_size, image_size)
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_upsampling_is_bilinear_from_8x8():
    x8, _ = datasets.digits_tensors("test", image_size=8)
    x16, _ = datasets.digits_tensors("test", image_size=16)
    ref = torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x16, ref)


def test_tensors_are_copies():
    x, y = datasets.digits_tensors("test")
    x.zero_()
    y.zero_()
    x2, y2 = datasets.digits_tensors("test")
    assert x2.abs().sum() > 0 and y2.sum() > 0


def test_loader_defaults_and_determinism():
    train = datasets.digits("train", batch_size=64)
    test = datasets.digits("test", batch_size=64)
    assert sum(len(y) for _, y in train) == 1438
    # test: not shuffled, in split order
    _, y_test = datasets.digits_tensors("test")
    assert torch.equal(torch.cat([y for _, y in test]), y_test)
    # train: shuffled, reproducible across loaders with the same seed, independent of global RNG
    torch.manual_seed(1)
    a = [y for _, y in datasets.digits("train", batch_size=64, seed=3)]
    torch.manual_seed(2)
    b = [y for _, y in datasets.digits("train", batch_size=64, seed=3)]
    c = [y for _, y in datasets.digits("train", batch_size=64, seed=4)]
    _, y_train = datasets.digits_tensors("train")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert not torch.equal(torch.cat(a), y_train)
    assert torch.equal(torch.cat(a).sort().values, y_train.sort().values)
    # shuffle can be overridden; drop_last is honoured
    assert torch.equal(torch.cat([y for _, y in datasets.digits("train", shuffle=False)]), y_train)
    assert len(datasets.digits("test", batch_size=100, drop_last=True)) == 3


def test_loader_does_not_touch_global_rng():
    state = torch.get_rng_state()
    for _ in datasets.digits("train", batch_size=128, seed=0):
        pass
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    "kwargs, argname",
    [
        (dict(split="val"), "split"),
        (dict(split=None), "split"),
        (dict(image_size=12), "image_size"),
        (dict(image_size=16.0), "image_size"),
        (dict(channels=2), "channels"),
        (dict(channels=True), "channels"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-3), "batch_size"),
        (dict(batch_size=1.5), "batch_size"),
    ],
)
def test_bad_arguments(kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        datasets.digits(**kwargs)
    tensor_kwargs = {k: v for k, v in kwargs.items() if k != "batch_size"}
    if tensor_kwargs:
        with pytest.raises(ValueError, match=argname):
            datasets.digits_tensors(**tensor_kwargs)


def test_num_classes():
    assert datasets.NUM_CLASSES == 10
