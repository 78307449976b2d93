"""``ignored_layers``: which layers must keep their width, and which groups that leaves whole.

Users name ignored layers by module or by qualified name; everything downstream works with names, because
names survive pruning (modules keep their names while their tensors are replaced) and deep copies.

Example:
    >>> import torch, torch.nn as nn
    >>> from pyobc.grouping import build_groups
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> names = resolve_ignored(net, [net[2]])
    >>> sorted(names)
    ['2', '2.bias', '2.weight']
    >>> sorted((g.root, is_ignored(g, names)) for g in build_groups(net, torch.randn(2, 4)))
    [('0', False), ('2', True)]
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..grouping import Group

__all__ = ["resolve_ignored", "is_ignored"]


def _module_and_name(model: nn.Module, layer: nn.Module | str, ids: dict[int, str]) -> tuple[nn.Module | None, str]:
    """The module ``layer`` designates and its qualified name (module None: ``layer`` names a bare parameter)."""
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer), layer
        except AttributeError:
            if layer in dict(model.named_parameters()):
                return None, layer
            raise ValueError(f"ignored_layers: the model has no layer named {layer!r}") from None
    if isinstance(layer, nn.Module):
        if id(layer) not in ids:
            raise ValueError(f"ignored_layers: {type(layer).__name__} is not a module of this model")
        return layer, ids[id(layer)]
    raise TypeError(f"ignored_layers entries must be modules or names, got {type(layer).__name__}")


def resolve_ignored(model: nn.Module, ignored_layers: Sequence[nn.Module | str] | nn.Module | str) -> set[str]:
    """Qualified names of ``ignored_layers`` (and of their submodules and parameters)."""
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    ids = {id(m): n for n, m in model.named_modules()}
    names: set[str] = set()
    for layer in ignored_layers:
        module, name = _module_and_name(model, layer, ids)
        if module is None:
            names.add(name)
            continue
        names.update(sub for sub, _ in module.named_modules(prefix=name))
        names.update(p for p, _ in module.named_parameters(prefix=name))
    return names


def is_ignored(group: Group, ignored: set[str]) -> bool:
    """Whether ``group`` is left whole: it would change the width of an ignored layer (an in-member only
    loses inputs, which Torch-Pruning also allows for ignored layers)."""
    return any(m.module in ignored and m.kind != "in" for m in group.members)
