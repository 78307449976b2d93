"""The scoring criteria and their registry.

Each criterion is a :class:`~pyobc.criteria.base.Criterion` subclass in a module of its own, registered
under its name with :func:`register`. ``pyobc.methods()`` lists them.

Example:
    >>> from pyobc.criteria import methods
    >>> methods()["obd"]
    'Optimal Brain Damage: 1/2 theta^2 times the diagonal empirical Fisher, summed per group'
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Criterion, Result

__all__ = ["Criterion", "Result", "register", "get_method", "methods", "ALIASES"]

_REGISTRY: dict[str, type[Criterion]] = {}
#: other names accepted for a criterion
ALIASES = {"obc": "jacobian"}
_loaded = False


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator adding a criterion to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a criterion named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    # every module of this package except base defines built-in criteria; imported on first lookup
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def get_method(name: str) -> type[Criterion]:
    """The criterion class registered as ``name`` (or an alias); ValueError listing the valid names."""
    _load_builtins()
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return _REGISTRY[key]


def methods() -> dict[str, str]:
    """Name -> one-line description of every available criterion."""
    _load_builtins()
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}
