"""An in-memory cache of groups per model structure, so that scoring one model several times (several
criteria, a :class:`pyobc.Pruner` step that rescores the same shapes...) traces it once.

The key is everything the dependency trace can depend on that pyobc can see: every module's qualified
name, class and ``extra_repr()`` (kernel sizes, strides, ``groups``...), every parameter's and buffer's
shape, dtype and ``requires_grad``, which parameters are tied, the train/eval flags, the structure of the
example inputs (shapes, dtypes and the values of non-tensor leaves), the tracer's forward function (its
code and the same description of what its closure holds), the ignored layers and the search options.
Parameter *values* are not part of it: groups do not depend on them. A forward pass whose control flow
depends on something else (a global flag, the values of the inputs) can get the groups of another
branch; pass ``cache=False`` to :func:`pyobc.grouping.build_groups` for such a model.

Example:
    >>> import torch, torch.nn as nn
    >>> a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    >>> structure_key(a, torch.ones(1, 2), None, ()) == structure_key(b, torch.ones(1, 2), None, ())
    True
    >>> structure_key(a, torch.ones(1, 2), None, ()) == structure_key(nn.Linear(2, 4), torch.ones(1, 2), None, ())
    False
"""
from __future__ import annotations

import collections
from typing import Any, Hashable

import torch
import torch.nn as nn

__all__ = ["structure_key", "lookup", "store", "clear", "MAX_ENTRIES"]

#: how many model structures are remembered (least recently used first out)
MAX_ENTRIES = 8

_CACHE: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()


def _describe(obj: Any, depth: int = 0) -> Hashable:
    """A hashable description of ``obj`` for the key: tensors by shape/dtype/device, containers by their
    contents, functions by their code and closure, other objects by type (and value for plain scalars)."""
    if depth > 6:
        return type(obj).__qualname__
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype), str(obj.device))
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return (type(obj).__name__, obj)
    if isinstance(obj, nn.Module):
        return ("M", id(obj))
    if isinstance(obj, dict) or hasattr(obj, "items") and callable(obj.items):
        try:
            return ("D", type(obj).__qualname__,
                    tuple((str(k), _describe(v, depth + 1)) for k, v in obj.items()))
        except Exception:
            return type(obj).__qualname__
    if isinstance(obj, (list, tuple)):
        return ("L", type(obj).__qualname__, tuple(_describe(v, depth + 1) for v in obj))
    code = getattr(obj, "__code__", None)
    if code is not None:
        cells = tuple(_describe(c.cell_contents, depth + 1) for c in (obj.__closure__ or ()))
        return ("F", code.co_filename, code.co_firstlineno, code.co_name, cells)
    return ("O", type(obj).__qualname__)


def structure_key(model: nn.Module, example_inputs: Any, forward_fn: Any, ignored: Any, *extra: Hashable) -> Hashable:
    """The cache key of one :func:`~pyobc.grouping.build_groups` call (see the module docstring)."""
    modules = tuple((n, type(m).__module__, type(m).__qualname__, m.extra_repr(), m.training)
                    for n, m in model.named_modules())
    params = tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad, id(p))
                   for n, p in model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    params = tuple((n, shape, dt, rg, first.setdefault(pid, n)) for n, shape, dt, rg, pid in params)
    buffers = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers())
    return (modules, params, buffers, _describe(example_inputs), _describe(forward_fn), tuple(sorted(ignored)),
            extra)


def lookup(key: Hashable) -> Any:
    """The cached value for ``key`` (None when absent); marks it recently used."""
    value = _CACHE.get(key)
    if value is not None:
        _CACHE.move_to_end(key)
    return value


def store(key: Hashable, value: Any) -> None:
    """Remember ``value`` for ``key``, dropping the least recently used entries past :data:`MAX_ENTRIES`."""
    _CACHE[key] = value
    _CACHE.move_to_end(key)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)


def clear() -> None:
    """Forget every cached structure.

    Example:
        >>> clear()
    """
    _CACHE.clear()
