"""Tensors inside nested batch structures (tuples, lists, dicts, namedtuples): one helper for all of pyobc.

Batches, model inputs and model outputs come as arbitrary nestings of containers. Everything in pyobc
that needs "every tensor in this object" or "this object with each tensor replaced" goes through the
two functions here, which use PyTorch's own pytree (:mod:`torch.utils._pytree`) so that containers
registered with it (``OrderedDict``, namedtuples, Hugging Face ``ModelOutput``...) are understood the
same way ``torch.compile`` and ``torch.func`` understand them. A mapping type that is not registered
(e.g. a ``UserDict`` such as a tokenizer's ``BatchEncoding``) is read as a plain ``dict``.

Example:
    >>> import torch
    >>> from pyobc.nested import map_tensors, tensors_in
    >>> batch = {"x": torch.ones(2, 3), "meta": ("id", torch.zeros(2))}
    >>> [tuple(t.shape) for t in tensors_in(batch)]
    [(2, 3), (2,)]
    >>> map_tensors(lambda t: t[:1], batch)["x"].shape
    torch.Size([1, 3])
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

__all__ = ["map_tensors", "tensors_in"]


def _unregistered_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and type(obj) not in pytree.SUPPORTED_NODES


def _as_pytree(obj: Any) -> Any:
    """``obj`` with mappings that pytree does not know turned into dicts (pytree would see a leaf)."""
    if _unregistered_mapping(obj):
        return {k: _as_pytree(v) for k, v in obj.items()}
    if type(obj) in pytree.SUPPORTED_NODES:
        # a module-level predicate, never a closure over ``obj``: pytree's flatten helper is a recursive
        # closure (a reference cycle), and a predicate holding ``obj`` would tie the model's outputs and
        # their whole autograd graph to that cycle until the garbage collector ran (the root itself is a
        # registered node, so the predicate is False for it anyway)
        children, spec = pytree.tree_flatten(obj, is_leaf=_unregistered_mapping)
        if any(_unregistered_mapping(c) for c in children):
            return pytree.tree_unflatten([_as_pytree(c) for c in children], spec)
    return obj


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with every tensor ``t`` replaced by ``fn(t)``; other leaves are kept as they are."""
    return pytree.tree_map_only(torch.Tensor, fn, _as_pytree(obj))


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj``, in pytree (depth-first, insertion) order."""
    return [leaf for leaf in pytree.tree_leaves(_as_pytree(obj)) if isinstance(leaf, torch.Tensor)]
