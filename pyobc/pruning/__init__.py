"""Physical pruning, iterative pruning, Equivalent Pruning, sparsification and Torch-Pruning interop.

Modules, in dependency order: :mod:`~pyobc.pruning.slicing` (cutting groups out of a model: the one table of
module updates), :mod:`~pyobc.pruning.counting` (params/MACs), :mod:`~pyobc.pruning.validation` (argument
checks), :mod:`~pyobc.pruning.ignored` (``ignored_layers``), :mod:`~pyobc.pruning.selection` (which channels
go), :mod:`~pyobc.pruning.report`, :mod:`~pyobc.pruning.adapters` (the Equivalent Pruning adapter module),
:mod:`~pyobc.pruning.reconstruct` (least-squares refit of the layers that lost inputs, structured OBS errors),
:mod:`~pyobc.pruning.plan` (``pyobc.save``/``pyobc.load``), :mod:`~pyobc.pruning.removal` (one pruning step:
plan it, perform it), :mod:`~pyobc.pruning.prune` (``pyobc.prune``), :mod:`~pyobc.pruning.pruner`
(``pyobc.Pruner``), :mod:`~pyobc.pruning.equivalent` (Optimal Brain Connection adapters),
:mod:`~pyobc.pruning.sparsify` (unstructured, with EC compensation) and :mod:`~pyobc.pruning.torch_pruning`
(an importance for Torch-Pruning's pruners).
"""
from __future__ import annotations

from .adapters import OBCAdapted
from .counting import count
from .equivalent import adapter_parameters, equivalent_prune, fold
from .plan import load, save
from .prune import prune
from .reconstruct import LayerFit, ReconstructionReport
from .pruner import Pruner
from .report import LayerWidth, PruneReport
from .sparsify import add_biases, remove_masks, sparsify
from .torch_pruning import TorchPruningImportance

__all__ = ["prune", "PruneReport", "LayerWidth", "count", "save", "load", "Pruner", "equivalent_prune",
           "adapter_parameters", "fold", "OBCAdapted", "sparsify", "remove_masks", "add_biases",
           "TorchPruningImportance", "ReconstructionReport", "LayerFit"]
