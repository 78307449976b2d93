"""Gated MLPs whose gate and up projections are one fused layer (Phi-3's ``gate_up_proj``).

``gate_up_proj`` (``hidden -> 2 * I``) is split in two halves that are multiplied (``act(gate) * up``) before
``down_proj`` (``I -> hidden``). Torch-Pruning's tracer does not couple a ``chunk`` followed by a product: it
groups the fused layer's ``2 * I`` rows with only the ``up`` half of ``down_proj``'s columns, and cutting
that breaks the model. pyobc builds the group from the modules instead (:func:`fused_mlps`): neuron ``i`` is
rows ``i`` and ``I + i`` of ``gate_up_proj`` and column ``i`` of ``down_proj``, and the two layers are kept
out of the traced groups.

Example:
    >>> import torch.nn as nn
    >>> mlp = nn.Module()
    >>> mlp.gate_up_proj, mlp.down_proj = nn.Linear(4, 16), nn.Linear(8, 4)
    >>> fused_mlps(nn.ModuleDict({"mlp": mlp}))
    [FusedMLP(module='mlp', gate_up='mlp.gate_up_proj', down='mlp.down_proj', width=8)]
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

__all__ = ["FusedMLP", "fused_mlps"]


@dataclasses.dataclass(frozen=True)
class FusedMLP:
    """One fused gated MLP: qualified names of the module and its two layers, and its width ``I``."""

    module: str
    gate_up: str
    down: str
    width: int


def fused_mlps(model: nn.Module) -> list[FusedMLP]:
    """Every module of ``model`` with ``gate_up_proj`` (``nn.Linear``, ``2 * I`` outputs) and ``down_proj``
    (``nn.Linear``, ``I`` inputs) children (see the module docstring)."""
    out = []
    for name, m in model.named_modules():
        gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if type(gate_up) is nn.Linear and type(down) is nn.Linear and gate_up.out_features == 2 * down.in_features:
            prefix = f"{name}." if name else ""
            out.append(FusedMLP(name, prefix + "gate_up_proj", prefix + "down_proj", down.in_features))
    return out
