"""pyobc's on-disk cache: location, atomic writes and safe loads.

The cache lives in ``$PYOBC_CACHE`` when that is set, else in ``~/.cache/pyobc``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["cache_dir", "atomic_save", "safe_load"]


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
