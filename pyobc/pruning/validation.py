"""Argument checks shared by :func:`pyobc.prune`, :class:`pyobc.Pruner`, :func:`pyobc.equivalent_prune` and
:func:`pyobc.sparsify`, so that every entry point rejects the same mistakes with the same messages.

Example:
    >>> check_prune_options(0.5, "global", "channels", None, 0.95)
    0.5
    >>> check_prune_options(1.0, "global", "channels", None, 0.95)
    Traceback (most recent call last):
    ...
    ValueError: ratio must be in [0, 1) (the fraction removed), got 1.0
"""
from __future__ import annotations

import math

import torch.nn as nn

from ..scoring.scores import Scores, model_signature
from .slicing import find_target

__all__ = ["SCOPES", "TARGETS", "check_prune_options", "check_scores"]

#: how channels are ranked: all groups together, or the same fraction of every group
SCOPES = ("global", "local")
#: the quantity whose fraction ``ratio`` is removed
TARGETS = ("channels", "params", "macs")


def check_prune_options(ratio: float, scope: str, target: str, round_to: int | None,
                        max_layer_ratio: float) -> float:
    """Raise TypeError/ValueError for an out-of-range pruning option; returns ``ratio`` as a float."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise TypeError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (the fraction removed), got {ratio}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    if isinstance(max_layer_ratio, bool) or not isinstance(max_layer_ratio, (int, float)) \
            or not 0.0 < max_layer_ratio <= 1.0:
        raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio!r}")
    return float(ratio)


def _signature_difference(want: dict, have: dict) -> str:
    """The first few differences between two model signatures, for the error message."""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shape = sorted(k for k in set(want) & set(have) if tuple(want[k]) != tuple(have[k]))
    parts = []
    if shape:
        parts.append("different shapes: " + ", ".join(f"{k} {tuple(want[k])} vs {tuple(have[k])}" for k in shape[:3]))
    if missing:
        parts.append("missing: " + ", ".join(missing[:3]))
    if extra:
        parts.append("not scored: " + ", ".join(extra[:3]))
    return "; ".join(parts)


def check_scores(model: nn.Module, scores: Scores) -> None:
    """Raise a clear error unless ``scores`` were computed on ``model`` as it is now.

    Example:
        >>> import torch, pyobc
        >>> net = pyobc.models.mlp(in_channels=1, input_size=4, hidden=(8,))
        >>> s = pyobc.score(net, None, "magnitude", example_inputs=torch.randn(2, 1, 4, 4))
        >>> check_scores(net, s)
        >>> check_scores(pyobc.models.mlp(in_channels=1, input_size=4, hidden=(6,)), s)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: these scores were computed on a different model ...: different shapes: layers.0.bias (8,) vs (6,), ...
    """
    if not isinstance(scores, Scores):
        raise TypeError(f"scores must be a pyobc.Scores (from pyobc.score), got {type(scores).__name__}")
    if scores.signature:
        have = model_signature(model)
        want = dict(scores.signature)
        if have != want:
            raise ValueError("these scores were computed on a different model (or on this one before it was "
                             "pruned, wrapped or masked): " + _signature_difference(want, have)
                             + ". Score the model as it is now.")
    for g in scores.groups:
        for m in g.members:
            try:
                find_target(model, m)
            except KeyError as e:
                raise ValueError(f"group {g.root!r}: {e.args[0]}; these scores belong to another model") from None
