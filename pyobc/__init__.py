"""pyobc: structured pruning with exact second-order criteria.

Heavy submodules (Torch-Pruning, the zoo, the scoring engine) are imported on first use so that
``import pyobc`` stays cheap.

Example:
    >>> import pyobc
    >>> "oba" in pyobc.methods()
    True
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute" (attribute None means the module itself)
_LAZY = {
    "ops": ("pyobc.ops", None),
    "models": ("pyobc.models", None),
    "datasets": ("pyobc.datasets", None),
    "corpus": ("pyobc.corpus", None),
    "losses": ("pyobc.losses", None),
    "metrics": ("pyobc.metrics", None),
    "eval": ("pyobc.eval", None),
    "distributed": ("pyobc.distributed", None),
    "score": ("pyobc.api", "score"),
    "Scores": ("pyobc.scoring.scores", "Scores"),
    "methods": ("pyobc.criteria", "methods"),
    "build_groups": ("pyobc.grouping", "build_groups"),
    "info": ("pyobc.versions", "info"),
    "pruning": ("pyobc.pruning", None),
    "prune": ("pyobc.pruning.prune", "prune"),
    "PruneReport": ("pyobc.pruning.report", "PruneReport"),
    "ReconstructionReport": ("pyobc.pruning.reconstruct", "ReconstructionReport"),
    "count": ("pyobc.pruning.counting", "count"),
    "save": ("pyobc.pruning.plan", "save"),
    "load": ("pyobc.pruning.plan", "load"),
    "Pruner": ("pyobc.pruning.pruner", "Pruner"),
    "equivalent_prune": ("pyobc.pruning.equivalent", "equivalent_prune"),
    "adapter_parameters": ("pyobc.pruning.equivalent", "adapter_parameters"),
    "fold": ("pyobc.pruning.equivalent", "fold"),
    "sparsify": ("pyobc.pruning.sparsify", "sparsify"),
    "remove_masks": ("pyobc.pruning.sparsify", "remove_masks"),
    "TorchPruningImportance": ("pyobc.pruning.torch_pruning", "TorchPruningImportance"),
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
