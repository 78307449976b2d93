"""Handling the user's model without changing it: looking through wrappers, restoring train/eval flags.

Example:
    >>> import torch.nn as nn
    >>> from pyobc.model_state import preserved_state, unwrap_model
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with preserved_state(net):
    ...     net[1].training
    False
    >>> net[1].training, unwrap_model(nn.DataParallel(net)) is net
    (True, True)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ["unwrap_model", "preserved_state"]

def unwrap_model(model: nn.Module) -> nn.Module:
    """The module to score: ``DistributedDataParallel``/``DataParallel`` wrappers and ``torch.compile``
    wrappers are looked through (their parameters are the wrapped module's)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


@contextlib.contextmanager
def preserved_state(model: nn.Module, training: bool = False) -> Iterator[None]:
    """Put every submodule in eval (or train) mode for the block, then restore each one's own flag.

    Scoring runs the model in eval mode so that BatchNorm uses (and does not update) its running
    statistics and dropout is off; users get their model back exactly as it was.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield
    finally:
        for m, flag in flags:
            m.training = flag

