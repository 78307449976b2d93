"""Unstructured pruning: zero the lowest-scored weights, keep them at zero, optionally compensate (EC).

Masks are ``torch.nn.utils.parametrize`` parametrizations (``weight = original * mask``, the mask a
buffer): the forward pass always sees the masked weight and autograd gives masked entries a zero
gradient, so any optimizer (momentum, Adam, weight decay on zeros) leaves them at exactly zero during
fine-tuning, without hooks to remember or optimizer steps to patch. The masks move with ``model.to()``.
While masked, parameter names gain ``parametrizations.weight.original``; :func:`remove_masks` makes the
zeros permanent and restores plain modules (do it before :func:`pyobc.save` or :func:`pyobc.score`).

Compensation needs a bias: ``ec`` gives layers without one no shift (and uncompensated scores). The convs
of the zoo's ResNets and VGGs have no bias (a BatchNorm follows), so only their classifiers would be
compensated; :func:`add_biases` gives every bias-free conv/linear layer a zero bias first (the model computes
exactly the same), then score that model with ``ec``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..layers import WEIGHT_LAYERS, is_weight_layer
from ..model_state import unwrap_model
from ..scoring.scores import Scores
from .validation import check_scores

__all__ = ["WeightMask", "sparsify", "remove_masks", "add_biases"]

SCOPES = ("global", "layer")


class WeightMask(nn.Module):
    """Parametrization ``weight -> weight * mask`` (``mask`` a bool buffer)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def _layers(model: nn.Module, names) -> dict[str, nn.Module]:
    out = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        if attr != "weight":
            continue
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the scores name {name!r}, which is not in the model") from None
        if is_weight_layer(layer):
            out[name] = layer
    return out


def sparsify(model: nn.Module, scores: Scores, sparsity: float, *, scope: str = "global",
             compensate: bool = True, inplace: bool = False) -> nn.Module:
    """Zero the ``sparsity`` fraction of conv/linear weights with the lowest scores and mask them.

    Args:
        model: the model ``scores`` were computed on.
        scores: per-weight scores (``pyobc.score(..., granularity="weight")``); only the ``weight`` tensors
            of conv and linear layers are sparsified (biases and norms are not).
        sparsity: fraction of those weights zeroed, in ``[0, 1)``.
        scope: ``"global"`` (one threshold over all layers; scores must be comparable) or ``"layer"`` (the
            same fraction in every layer).
        compensate: when the scores carry per-weight bias shifts (``ec``: ``extras["ec_shift"]``), add to
            each bias ``b_i`` the sum of the shifts of row ``i``'s removed weights. Scores without shifts
            (every other criterion) are applied without compensation.
        inplace: change ``model`` itself (default: a copy is returned).

    Returns the model with :class:`WeightMask` parametrizations; fine-tune it (masked weights stay zero),
    then :func:`remove_masks`.

    Example:
        >>> import torch, pyobc
        >>> net = pyobc.models.mlp(in_channels=1, input_size=4, hidden=(8,))
        >>> x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 10, (16,))
        >>> s = pyobc.score(net, [(x, y)], "ec", granularity="weight")
        >>> sparse = pyobc.sparsify(net, s, 0.5)
        >>> float((pyobc.remove_masks(sparse).layers[0].weight == 0).float().mean()) >= 0.3
        True
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    model = unwrap_model(model)
    check_scores(model, scores)
    per_param = scores.by_parameter()
    layers = _layers(model, per_param)
    if not layers:
        raise ValueError("the scores have no conv/linear weight scores to sparsify with")
    names = list(layers)
    vals = [per_param[n].detach().to("cpu", torch.float64).reshape(-1) for n in names]
    for n, v in zip(names, vals):
        if v.numel() != layers[n].weight.numel():
            raise ValueError(f"scores for {n!r} have {v.numel()} entries, the weight has {layers[n].weight.numel()}")
    removed: dict[str, torch.Tensor] = {}
    if scope == "global":
        flat = torch.cat(vals)
        k = int(math.floor(sparsity * flat.numel() + 0.5))
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.argsort(flat, stable=True)[:k]] = True
        offset = 0
        for n, v in zip(names, vals):
            removed[n] = drop[offset:offset + v.numel()]
            offset += v.numel()
    else:
        for n, v in zip(names, vals):
            k = int(math.floor(sparsity * v.numel() + 0.5))
            drop = torch.zeros(v.numel(), dtype=torch.bool)
            drop[torch.argsort(v, stable=True)[:k]] = True
            removed[n] = drop

    out = model if inplace else copy.deepcopy(model)
    shifts = scores.extras.get("ec_shift") if compensate else None
    with torch.no_grad():
        for n in names:
            layer = out.get_submodule(n.rpartition(".")[0])
            w = layer.weight
            drop = removed[n].reshape(w.shape).to(w.device)
            if shifts and n in shifts and layer.bias is not None:
                shift = shifts[n].to(w.device, torch.float64)
                layer.bias.add_((shift * drop).reshape(shift.shape[0], -1).sum(1).to(layer.bias.dtype))
            keep = ~drop
            w.mul_(keep.to(w.dtype))
            parametrize.register_parametrization(layer, "weight", WeightMask(keep))
    return out


def remove_masks(model: nn.Module) -> nn.Module:
    """Make masked zeros permanent: remove every :class:`WeightMask` parametrization; returns ``model``.

    Example:
        >>> # plain = pyobc.remove_masks(sparse)     # ordinary modules, zeros in the weights
    """
    model = unwrap_model(model)
    for m in list(model.modules()):
        if parametrize.is_parametrized(m, "weight") and any(isinstance(p, WeightMask)
                                                            for p in m.parametrizations.weight):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def add_biases(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Give every bias-free conv/linear layer a zero bias (outputs unchanged), so that elimination-
    compensation has a bias to shift in every layer; returns the model (a copy unless ``inplace``).

    Example:
        >>> import pyobc
        >>> net = pyobc.pruning.add_biases(pyobc.models.resnet20(in_channels=1, input_size=8, width=0.25))
        >>> float(net.conv1.bias.abs().sum())
        0.0
    """
    out = unwrap_model(model)
    out = out if inplace else copy.deepcopy(out)
    for m in out.modules():
        if isinstance(m, WEIGHT_LAYERS) and m.bias is None:
            w = m.weight
            channels = w.shape[1] * m.groups if getattr(m, "transposed", False) else w.shape[0]
            m.bias = nn.Parameter(torch.zeros(channels, dtype=w.dtype, device=w.device))
    return out
