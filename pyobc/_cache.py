"""pyobc's on-disk cache: location, atomic writes and safe loads.

The cache lives in ``$PYOBC_CACHE`` when that is set, else in ``~/.cache/pyobc``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["cache_dir", "atomic_save", "safe_load", "save_model"]


def cache_dir(override: str | os.PathLike | None = None, *parts: str) -> Path:
    """The cache directory (``override``, else ``$PYOBC_CACHE``, else ``~/.cache/pyobc``) joined
    with ``parts``. Nothing is created."""
    if override is not None:
        root = Path(override)
    else:
        env = os.environ.get("PYOBC_CACHE")
        root = Path(env) if env else Path.home() / ".cache" / "pyobc"
    return root.expanduser().joinpath(*parts)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``, so readers
    never see a half-written file. Creates the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def safe_load(path: str | os.PathLike):
    """``torch.load(path, weights_only=True, map_location="cpu")``, or None when the file is
    missing, unreadable or corrupted."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # corrupted, truncated, from an incompatible version, not a torch file...
        return None


def save_model(model: torch.nn.Module, header: dict, path: str | os.PathLike, stacklevel: int = 2) -> Path | None:
    """Cache a trained model: ``header`` (format, version, config, metadata), its CPU ``state_dict`` and the
    torch version, written atomically to ``path``. Returns the path, or None with a warning (pointing
    ``stacklevel`` frames up) when it cannot be written: the model is still usable, it is just trained
    again next time."""
    blob = {**header, "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "torch_version": str(torch.__version__)}
    try:
        return atomic_save(blob, path)
    except OSError as exc:
        warnings.warn(f"pyobc: could not write the model cache {path}: {exc}", RuntimeWarning,
                      stacklevel=stacklevel + 1)
        return None
