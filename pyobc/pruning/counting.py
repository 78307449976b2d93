"""Parameter and multiply-accumulate (MAC) counts, measured with pyobc's own forward hooks.

Parameters: every parameter of the model (``numel`` summed; tied parameters once).

MACs, per input sample (the example batch's count divided by its size), of the layers that do the
arithmetic, found by one forward pass with hooks:

* ``nn.Conv1d/2d/3d``: ``output positions x weight.numel()`` (``out x in/groups x kernel`` per position);
* ``nn.Linear`` (and Hugging Face's ``Conv1D``, a linear layer with its weight stored ``(in, out)``):
  ``rows x weight.numel()`` (rows: every leading position, e.g. tokens);
* ``nn.MultiheadAttention``: the q, k, v projections (``L``, ``S``, ``S`` rows), the two attention
  products ``2 L S E`` and the output projection (``L`` rows).

Norms, activations, pooling, additions and biases are not counted (they are small and vary between counting
tools). Because a layer's cost is its recorded positions times its weight size, the same records also
*predict* the MACs of any pruned shapes (:func:`macs_from`), which is how :func:`pyobc.prune` meets a MAC
target without building candidate models.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    >>> count(net, torch.randn(2, 3, 4, 4))
    (1514, 4736)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..grouping import canonical_parameter_names
from ..layers import CONV, LINEAR, is_transposed_linear
from ..model_state import preserved_state, unwrap_model
from ..nested import tensors_in

__all__ = ["LayerCost", "trace_costs", "macs_from", "count_params", "count", "tensor_shapes", "run_naming_failure"]


@dataclasses.dataclass
class LayerCost:
    """The per-sample workload of one layer: ``rows`` (positions/tokens) for conv/linear; ``L``, ``S`` and
    ``LS`` for attention."""

    name: str
    kind: str  # "conv", "linear" or "attention"
    rows: float = 0.0
    L: float = 0.0
    S: float = 0.0
    LS: float = 0.0
    weight: str = ""  #: the canonical name of the layer's weight (tied weights have one), "" for attention


def _batch_size(inputs: Any) -> int:
    """The leading size of the first tensor in ``inputs`` (1 when there is none, or it is a scalar)."""
    first = next(iter(tensors_in(inputs)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def trace_costs(model: nn.Module, example_inputs: Any) -> list[LayerCost]:
    """Run ``model(example_inputs)`` once (eval mode, no grad) and record every layer's workload."""
    model = unwrap_model(model)
    n = _batch_size(example_inputs)
    costs: dict[str, LayerCost] = {}
    handles = []

    def conv_hook(name):
        def hook(m, args, out):
            c = costs.setdefault(name, LayerCost(name, "conv"))
            if out.dim() == m.weight.dim():  # (N, C, *spatial)
                c.rows += out.shape[0] * out[0, 0].numel()
            else:  # unbatched (C, *spatial)
                c.rows += out[0].numel()
        return hook

    def linear_hook(name):
        def hook(m, args, out):
            c = costs.setdefault(name, LayerCost(name, "linear"))
            c.rows += out.numel() // max(1, m.weight.shape[1 if is_transposed_linear(m) else 0])
        return hook

    def attention_hook(name):
        def hook(m, args, kwargs, out):
            q = args[0] if len(args) > 0 else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            c = costs.setdefault(name, LayerCost(name, "attention"))
            if q.dim() == 3:
                t = 1 if m.batch_first else 0
                b = q.shape[1 - t]
                lq, sk = q.shape[t], k.shape[t]
            else:
                b, lq, sk = 1, q.shape[0], k.shape[0]
            c.L += b * lq
            c.S += b * sk
            c.LS += b * lq * sk
        return hook

    for name, m in model.named_modules():
        if isinstance(m, CONV):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, LINEAR) or is_transposed_linear(m):
            handles.append(m.register_forward_hook(linear_hook(name)))
        elif isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(attention_hook(name), with_kwargs=True))
    try:
        with preserved_state(model), torch.no_grad():
            run_naming_failure(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    canonical = canonical_parameter_names(model)
    for c in costs.values():
        if c.kind != "attention":
            c.weight = canonical.get(f"{c.name}.weight" if c.name else "weight", "")
        c.rows /= n
        c.L /= n
        c.S /= n
        c.LS /= n
    return list(costs.values())


def run_naming_failure(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` (a dict is keywords, a tuple/list positional); when it raises, a RuntimeError
    naming the innermost module that was running, with the original error chained.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Linear(2, 1))
        >>> run_naming_failure(net, torch.randn(1, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: Sequential fails inside '1' (Linear): RuntimeError: mat1 and mat2 shapes cannot be multiplied ...
    """
    stack: list[str] = []
    handles = []

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: stack.append(n)))
        handles.append(m.register_forward_hook(leave))
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)
    except Exception as e:
        where = stack[-1] if stack else ""
        kind = type(model.get_submodule(where)).__name__
        raise RuntimeError(f"{type(model).__name__} fails inside {where!r} ({kind}): "
                           f"{type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and buffer."""
    out = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    return out


def macs_from(costs: list[LayerCost], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """MACs per sample of recorded layers with parameters of the given ``shapes`` (name -> shape)."""
    total = 0.0
    for c in costs:
        p = (lambda attr: f"{c.name}.{attr}" if c.name else attr)
        if c.kind in ("conv", "linear"):
            total += c.rows * _numel(shapes[c.weight or p("weight")])
        else:
            if p("in_proj_weight") in shapes:
                w = shapes[p("in_proj_weight")]
                e = w[0] // 3
                q_cost = e * w[1]
                k_cost = v_cost = e * w[1]
            else:
                q_cost = _numel(shapes[p("q_proj_weight")])
                k_cost = _numel(shapes[p("k_proj_weight")])
                v_cost = _numel(shapes[p("v_proj_weight")])
                e = shapes[p("q_proj_weight")][0]
            out = shapes[p("out_proj.weight")]
            total += c.L * q_cost + c.S * (k_cost + v_cost) + 2 * c.LS * e + c.L * _numel(out)
    return int(round(total))


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied parameters counted once)."""
    return sum(p.numel() for p in unwrap_model(model).parameters())


def count(model: nn.Module, example_inputs: Any = None) -> tuple[int, int | None]:
    """``(parameters, MACs per sample)``; MACs are None without ``example_inputs``.

    Example:
        >>> import torch, pyobc
        >>> net = pyobc.models.mlp(in_channels=1, input_size=4, hidden=(8,))
        >>> pyobc.count(net, torch.randn(1, 1, 4, 4))
        (226, 208)
    """
    params = count_params(model)
    if example_inputs is None:
        return params, None
    model = unwrap_model(model)
    return params, macs_from(trace_costs(model, example_inputs), tensor_shapes(model))
