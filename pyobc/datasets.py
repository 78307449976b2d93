"""Real data for pyobc's demo, tests and benchmarks: the UCI handwritten digits.

The data ship inside the package (``pyobc/data/digits.npz``): the UCI "Optical Recognition of
Handwritten Digits" test set as distributed with scikit-learn (``sklearn.datasets.load_digits``),
1,797 grey-scale images of 8x8 pixels with values 0-16 and labels 0-9.
Authors: E. Alpaydin and C. Kaynak, 1998. License: CC BY 4.0, UCI Machine Learning Repository,
https://doi.org/10.24432/C50P49 (see ``pyobc/data/DIGITS_README.md``).

The split is a fixed, stratified 80/20 split (1,438 train / 359 test images). It is defined by
SHA-256 hashes of the sample indices, so it does not depend on any random number generator and is
identical on every run and machine. Pixels are scaled to ``[0, 1]`` and normalised with the mean
and standard deviation of the train split (stored below as constants), then upsampled from 8x8
with bilinear interpolation (``align_corners=False``) when ``image_size`` is 16 or 32.

Example:
    >>> from pyobc import datasets
    >>> loader = datasets.digits("train", batch_size=32, image_size=16, channels=1)
    >>> x, y = next(iter(loader))
    >>> tuple(x.shape), x.dtype, y.dtype
    ((32, 1, 16, 16), torch.float32, torch.int64)
"""
from __future__ import annotations

import hashlib
import threading
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .corpus import VOCAB_SIZE as TEXT_VOCAB_SIZE
from .corpus import ByteTokenizer, token_stream

__all__ = ["NUM_CLASSES", "MEAN", "STD", "IMAGE_SIZES", "digits", "digits_tensors", "split_indices",
           "TEXT_VOCAB_SIZE", "ByteTokenizer", "text", "text_tokens"]

NUM_CLASSES = 10
#: Valid values of ``image_size``.
IMAGE_SIZES = (8, 16, 32)
#: Valid values of ``channels``.
CHANNELS = (1, 3)
#: Mean and standard deviation of the train split's pixels after scaling to [0, 1] (computed in
#: float64 from the shipped data; ``tests/test_datasets.py`` checks them).
MEAN = 0.30603893211057026
STD = 0.3764931368950966
#: Fraction of each class that goes to the test split.
TEST_FRACTION = 0.2

_SPLIT_SALT = "pyobc-digits-split-v1"
_SPLITS = ("train", "test")

_lock = threading.Lock()
_raw: tuple[np.ndarray, np.ndarray] | None = None
_tensors: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """The shipped arrays ``x`` (1797, 64) uint8 and ``y`` (1797,) uint8, read once per process."""
    global _raw
    if _raw is None:
        with resources.files("pyobc").joinpath("data/digits.npz").open("rb") as fh:
            with np.load(fh) as data:
                x = np.array(data["x"], dtype=np.uint8)
                y = np.array(data["y"], dtype=np.uint8)
        if x.shape != (1797, 64) or y.shape != (1797,):
            raise RuntimeError(f"pyobc/data/digits.npz is damaged: x {x.shape}, y {y.shape}")
        _raw = (x, y)
    return _raw


def _sort_key(index: int) -> bytes:
    return hashlib.sha256(f"{_SPLIT_SALT}:{index}".encode()).digest()


def split_indices(split: str) -> np.ndarray:
    """Sorted indices (into the shipped arrays) of the ``"train"`` or ``"test"`` split.

    Within each class the samples are ordered by a SHA-256 hash of their index and the first
    ``round(0.2 * class_size)`` go to the test split.

    Example:
        >>> from pyobc.datasets import split_indices
        >>> len(split_indices("train")), len(split_indices("test"))
        (1438, 359)
    """
    _check_split(split)
    _, y = _load_raw()
    is_test = np.zeros(len(y), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        order = sorted(idx.tolist(), key=_sort_key)
        n_test = int(len(idx) * TEST_FRACTION + 0.5)
        is_test[order[:n_test]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _check_split(split) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_int(name: str, value, allowed=None, minimum=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _cached_tensors(split: str, image_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (split, int(image_size), int(channels))
    with _lock:
        if key not in _tensors:
            x_raw, y_raw = _load_raw()
            idx = split_indices(split)
            x = torch.from_numpy(x_raw[idx].astype(np.float32)).reshape(-1, 1, 8, 8)
            x = (x / 16.0 - MEAN) / STD
            if image_size != 8:
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
            if channels == 3:
                x = x.repeat(1, 3, 1, 1)
            x = x.contiguous()
            y = torch.from_numpy(y_raw[idx].astype(np.int64))
            _tensors[key] = (x, y)
        return _tensors[key]


def digits_tensors(split: str = "train", image_size: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as tensors ``(x, y)``.

    ``x`` is float32 of shape (N, channels, image_size, image_size), normalised; ``y`` is int64 of
    shape (N,). N is 1438 for ``"train"`` and 359 for ``"test"``. The decoded tensors are cached
    per process; each call returns fresh copies, so callers may modify them.

    Example:
        >>> from pyobc.datasets import digits_tensors
        >>> x, y = digits_tensors("test", image_size=16, channels=3)
        >>> tuple(x.shape), tuple(y.shape)
        ((359, 3, 16, 16), (359,))
    """
    _check_split(split)
    _check_int("image_size", image_size, IMAGE_SIZES)
    _check_int("channels", channels, CHANNELS)
    x, y = _cached_tensors(split, image_size, channels)
    return x.clone(), y.clone()


def digits(
    split: str = "train",
    batch_size: int = 64,
    image_size: int = 8,
    channels: int = 1,
    shuffle: bool | None = None,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over a split of the digits data.

    Args:
        split: ``"train"`` (1438 images) or ``"test"`` (359 images).
        batch_size: positive batch size.
        image_size: 8 (native), 16 or 32 (bilinear upsampling).
        channels: 1, or 3 to repeat the grey channel (for RGB models).
        shuffle: defaults to True for ``"train"`` and False for ``"test"``.
        seed: seeds the loader's own :class:`torch.Generator`, so the batch order is reproducible
            and torch's global RNG is neither used nor changed. Successive passes over the same
            loader see different (but reproducible) orders.
        num_workers, drop_last: passed to the DataLoader.

    Batches are ``(x, y)``: float32 (B, channels, image_size, image_size) and int64 (B,).
    """
    _check_split(split)
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("image_size", image_size, IMAGE_SIZES)
    _check_int("channels", channels, CHANNELS)
    _check_int("num_workers", num_workers, minimum=0)
    _check_int("seed", seed)
    if shuffle is None:
        shuffle = split == "train"
    x, y = _cached_tensors(split, image_size, channels)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        TensorDataset(x, y),
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        generator=generator,
        num_workers=int(num_workers),
        drop_last=bool(drop_last),
    )


# ---------------------------------------------------------------------------------------------- text
# Token ids of an English corpus for language models; the corpus, its split and the byte-level
# tokenizer are described in :mod:`pyobc.corpus`.


def text_tokens(split: str = "train") -> torch.Tensor:
    """The ``"train"`` or ``"test"`` (held-out) split of pyobc's text corpus as one 1-D int64 token
    stream (byte-level ids, :data:`TEXT_VOCAB_SIZE` = 259; see :mod:`pyobc.corpus`). Pass the test
    stream to :func:`pyobc.metrics.perplexity`.

    Example:
        >>> from pyobc import datasets
        >>> stream = datasets.text_tokens("test")
        >>> stream.dim(), stream.dtype, int(stream.max()) < datasets.TEXT_VOCAB_SIZE
        (1, torch.int64, True)
    """
    return token_stream(split)


def text(
    split: str = "train",
    seq_len: int = 128,
    batch_size: int = 16,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` of token-id batches for causal language models.

    The split's token stream (:func:`text_tokens`) is cut into non-overlapping windows of ``seq_len``
    tokens (the remainder is dropped); each batch is a LongTensor (B, seq_len), ready for
    :func:`pyobc.losses.causal_lm` (e.g. ``pyobc.score(model, loader, loss_fn=pyobc.losses.causal_lm)``).
    ``shuffle`` defaults to True for ``"train"``; ``seed`` seeds the loader's own generator (torch's
    global RNG is neither used nor changed).

    Example:
        >>> from pyobc import datasets
        >>> batch = next(iter(datasets.text("train", seq_len=64, batch_size=4)))
        >>> tuple(batch.shape), batch.dtype
        ((4, 64), torch.int64)
    """
    _check_int("seq_len", seq_len, minimum=2)
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("seed", seed)
    stream = token_stream(split)
    n = stream.numel() // seq_len
    if n == 0:
        raise ValueError(f"seq_len={seq_len} is longer than the {split!r} stream ({stream.numel()} tokens)")
    if shuffle is None:
        shuffle = split == "train"
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    windows = stream[: n * seq_len].reshape(n, seq_len)
    return DataLoader(windows, batch_size=int(batch_size), shuffle=bool(shuffle), generator=generator,
                      drop_last=bool(drop_last))
