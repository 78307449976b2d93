"""Model registry and digits-trained reference models (cached on disk)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import datasets
from .._cache import safe_load, save_model
from .._cache import cache_dir as cache_root
from .mlp import mlp
from .resnet import resnet20, resnet32, resnet56
from .training import RandomShift, evaluate, train
from .vgg import vgg11, vgg16, vgg19
from .vit import vit_tiny

__all__ = ["ZOO_VERSION", "RECIPES", "TrainedInfo", "get", "names", "trained", "trained_info"]

#: Bumped whenever an architecture, the data pipeline or a training recipe changes; part of every
#: cache file's name and metadata, so stale caches are retrained rather than reused.
ZOO_VERSION = "pyobc-zoo-1"
_FORMAT = 1

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vit_tiny": vit_tiny,
}


def names() -> list[str]:
    """Sorted names of the zoo's models.

    Example:
        >>> from pyobc import models
        >>> models.names()[:3]
        ['mlp', 'resnet20', 'resnet32']
    """
    return sorted(_BUILDERS)


def get(name: str, **kwargs) -> nn.Module:
    """Build zoo model ``name`` (randomly initialised from torch's global RNG).

    Every builder takes ``num_classes=10, in_channels=3, input_size=32`` and ``width``; see each
    builder for its own extra options.

    Example:
        >>> from pyobc import models
        >>> type(models.get("vgg11", in_channels=1, input_size=8)).__name__
        'VGG'
    """
    try:
        builder = _BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}") from None
    return builder(**kwargs)


# Training recipes for `trained` (digits, train split; batch order and augmentation seeded).
# `epochs` is the default when the caller passes none; `shift` is the RandomShift range in native
# 8x8 pixels (scaled with image_size). Test accuracy with the defaults (16x16, 1 channel, seed 0,
# 2 threads): mlp 98.1%, resnet20 99.2%, resnet32 98.6%, resnet56 98.6%, vgg11 98.6%,
# vgg16 98.6%, vgg19 98.9%, vit_tiny 97.2%. ResNet-20 trains in ~30 s on 2 idle CPU cores;
# the others take roughly 1-15 min (vgg16/vgg19 the longest), much longer on a busy CPU.
RECIPES: dict[str, dict] = {
    "mlp": dict(epochs=30, batch_size=64, optimizer="sgd", lr=0.1, weight_decay=5e-4, warmup=0.0,
                label_smoothing=0.0, shift=0),
    "resnet20": dict(epochs=15, batch_size=64, optimizer="sgd", lr=0.1, weight_decay=5e-4, warmup=0.0,
                     label_smoothing=0.0, shift=1),
    "resnet32": dict(epochs=15, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup=0.1,
                     label_smoothing=0.0, shift=1),
    "resnet56": dict(epochs=15, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup=0.1,
                     label_smoothing=0.0, shift=1),
    "vgg11": dict(epochs=8, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup=0.1,
                  label_smoothing=0.0, shift=1),
    "vgg16": dict(epochs=8, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup=0.1,
                  label_smoothing=0.0, shift=1),
    "vgg19": dict(epochs=8, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup=0.1,
                  label_smoothing=0.0, shift=1),
    "vit_tiny": dict(epochs=60, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup=0.1,
                     label_smoothing=0.0, shift=1),
}


@dataclasses.dataclass(frozen=True)
class TrainedInfo:
    """What :func:`trained` knows about the model it returns (``model.trained_info``)."""

    name: str
    test_accuracy: float  #: top-1 accuracy on the digits test split (359 images), in [0, 1]
    train_accuracy: float  #: top-1 accuracy on the train split, in [0, 1]
    config: dict  #: everything the weights depend on (model, data, recipe, seed, zoo version)
    zoo_version: str
    train_seconds: float  #: wall time of the training run that produced the weights
    from_cache: bool  #: True when the weights were loaded rather than trained now
    path: str | None  #: the cache file (None if it could not be written)


@contextlib.contextmanager
def _preserved_torch_state():
    """Snapshot torch's global CPU RNG, thread count and determinism flags; restore them on exit."""
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (det, det_warn):
            torch.use_deterministic_algorithms(det, warn_only=det_warn)


def _json_clean(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def _config(name, image_size, channels, epochs, seed, model_kwargs) -> dict:
    recipe = dict(RECIPES[name])
    recipe["epochs"] = recipe["epochs"] if epochs is None else epochs
    return _json_clean(
        {
            "name": name,
            "image_size": image_size,
            "channels": channels,
            "num_classes": 10,
            "seed": seed,
            "model_kwargs": model_kwargs,
            "recipe": recipe,
            "zoo_version": ZOO_VERSION,
        }
    )


def _cache_path(config: dict, cache_dir) -> Path:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    fname = (
        f"{config['name']}_{config['image_size']}px_{config['channels']}ch_"
        f"e{config['recipe']['epochs']}_seed{config['seed']}_{digest}.pt"
    )
    return cache_root(cache_dir, "models", ZOO_VERSION) / fname


def _build(config: dict) -> nn.Module:
    return get(
        config["name"],
        num_classes=config["num_classes"],
        in_channels=config["channels"],
        input_size=config["image_size"],
        **config["model_kwargs"],
    )


def _try_load(path: Path, config: dict) -> tuple[nn.Module, dict] | None:
    """The cached model and its metadata, or None when the file is missing, damaged or for another config."""
    blob = safe_load(path)
    if not isinstance(blob, dict):
        return None
    try:
        if blob.get("format") != _FORMAT or blob.get("zoo_version") != ZOO_VERSION or blob.get("config") != config:
            return None
        model = _build(config)
        model.load_state_dict(blob["state_dict"], strict=True)
        meta = {k: blob[k] for k in ("test_accuracy", "train_accuracy", "train_seconds")}
        if not all(isinstance(v, float) for v in meta.values()):
            return None
    except Exception:
        return None
    return model, meta


def _check_args(name, image_size, channels, epochs, seed, model_kwargs, num_threads=None) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size not in (8, 16, 32):
        raise ValueError(f"image_size must be 8, 16 or 32, got {image_size!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0):
        raise ValueError(f"epochs must be None or a non-negative int, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be None or a positive int, got {num_threads!r}")
    for key in ("num_classes", "in_channels", "input_size"):
        if key in model_kwargs:
            raise ValueError(f"{key} is set by trained() (from the data); do not pass it")
    try:
        json.dumps(model_kwargs)
    except TypeError as exc:
        raise ValueError(f"model_kwargs must be JSON-serialisable: {exc}") from None


def trained(
    name: str = "resnet20",
    image_size: int = 16,
    channels: int = 1,
    epochs: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    *,
    force: bool = False,
    num_threads: int | None = None,
    **model_kwargs,
) -> nn.Module:
    """Zoo model ``name`` trained on the digits train split, in eval mode, on the CPU.

    The first call trains it (with the recipe in :data:`RECIPES`, a fixed ``seed`` and its own
    generators; torch's global RNG state, thread count and determinism flags are left as they
    were) and saves the ``state_dict`` and metadata to ``<cache>/models/<zoo version>/``, where
    ``<cache>`` is ``cache_dir``, else ``$PYOBC_CACHE``, else ``~/.cache/pyobc``. Later calls load
    that file (``torch.load(weights_only=True)``); a corrupted or incompatible file is retrained
    and overwritten. ``force=True`` retrains regardless.

    Args:
        name: one of :func:`names`.
        image_size: 8, 16 or 32 (digits upsampled bilinearly); also the model's ``input_size``.
        channels: 1 (grey) or 3 (grey repeated); also the model's ``in_channels``.
        epochs: None for the recipe's default.
        seed: seeds model initialisation, batch order and augmentation.
        progress: tqdm bar while training (None: only when stderr is a terminal).
        force: retrain (and overwrite the cache file) even if a valid one exists.
        num_threads: torch intra-op threads to train with (restored afterwards); None keeps the
            current setting. On a CPU shared with other busy processes, ``num_threads=1`` can be
            several times faster than 2. Results can differ in the last bits with the thread
            count, so weights are reproducible for a given machine and thread count.
        **model_kwargs: extra builder options (e.g. ``width=0.5``, ``hidden=(32,)``); JSON-able.

    Returns the model with ``model.trained_info`` (a :class:`TrainedInfo`) and
    ``model.test_accuracy`` (a float in [0, 1], the same as ``trained_info.test_accuracy``).
    """
    _check_args(name, image_size, channels, epochs, seed, model_kwargs, num_threads)
    config = _config(name, image_size, channels, epochs, seed, model_kwargs)
    path = _cache_path(config, cache_dir)
    loaded = None if force else _try_load(path, config)
    from_cache = loaded is not None
    if from_cache:
        model, meta = loaded
    else:
        model, meta = _train_now(config, progress, num_threads)
        path = _save(model, config, meta, path)
    model.eval()
    info = TrainedInfo(
        name=name,
        test_accuracy=meta["test_accuracy"],
        train_accuracy=meta["train_accuracy"],
        config=copy.deepcopy(config),
        zoo_version=ZOO_VERSION,
        train_seconds=meta["train_seconds"],
        from_cache=from_cache,
        path=None if path is None else str(path),
    )
    model.trained_info = info
    model.test_accuracy = info.test_accuracy
    return model


def _train_now(config: dict, progress: bool | None, num_threads: int | None) -> tuple[nn.Module, dict]:
    """Build and train the model ``config`` describes with its recipe; returns it and its accuracies and
    training time. Torch's global RNG, thread count and determinism flags are restored afterwards."""
    recipe, seed = config["recipe"], config["seed"]
    image_size, channels = config["image_size"], config["channels"]
    with _preserved_torch_state():
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        torch.manual_seed(seed)
        model = _build(config)
        train_loader = datasets.digits(
            "train", batch_size=recipe["batch_size"], image_size=image_size, channels=channels, seed=seed
        )
        start = time.perf_counter()
        train(
            model,
            train_loader,
            epochs=recipe["epochs"],
            lr=recipe["lr"],
            weight_decay=recipe["weight_decay"],
            progress=progress,
            optimizer=recipe["optimizer"],
            warmup=recipe["warmup"],
            label_smoothing=recipe["label_smoothing"],
            augment=RandomShift(recipe["shift"] * (image_size // 8), seed=seed) if recipe["shift"] else None,
        )
        seconds = time.perf_counter() - start
        train_eval = datasets.digits("train", batch_size=256, image_size=image_size, channels=channels, shuffle=False)
        test = datasets.digits("test", batch_size=256, image_size=image_size, channels=channels)
        meta = {
            "test_accuracy": float(evaluate(model, test)),
            "train_accuracy": float(evaluate(model, train_eval)),
            "train_seconds": float(seconds),
        }
    return model, meta


def _save(model: nn.Module, config: dict, meta: dict, path: Path) -> Path | None:
    """Write the weights and metadata to the cache file ``path``; returns it, or None (with a warning)
    when it cannot be written: the model is still usable, it is just trained again next time."""
    # stacklevel 3: a warning points at the caller of trained()
    return save_model(model, {"format": _FORMAT, "zoo_version": ZOO_VERSION, "config": config, **meta}, path,
                      stacklevel=3)


def trained_info(model: nn.Module) -> TrainedInfo:
    """The :class:`TrainedInfo` attached by :func:`trained` (ValueError if there is none).

    Example:
        >>> from pyobc import models
        >>> models.trained_info(models.get("mlp"))
        Traceback (most recent call last):
        ...
        ValueError: model was not returned by pyobc.models.trained()
    """
    info = getattr(model, "trained_info", None)
    if not isinstance(info, TrainedInfo):
        raise ValueError("model was not returned by pyobc.models.trained()")
    return info
