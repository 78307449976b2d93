"""pyobc: structured pruning with exact second-order criteria.

Heavy submodules (Torch-Pruning, the zoo, the scoring engine) are imported on first use so that
``import pyobc`` stays cheap.

Example:
    >>> import pyobc
    >>> sorted(pyobc.methods())[:2]
    ['jacobian', 'magnitude']
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute" (attribute None means the module itself)
_LAZY = {
    "ops": ("pyobc.ops", None),
    "models": ("pyobc.models", None),
    "datasets": ("pyobc.datasets", None),
    "score": ("pyobc.scoring.engine", "score"),
    "Scores": ("pyobc.scores", "Scores"),
    "methods": ("pyobc.criteria", "methods"),
    "build_groups": ("pyobc.grouping", "build_groups"),
    "info": ("pyobc.info", "info"),
}


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'pyobc' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
