"""Block-by-block scoring of transformers: peak memory of one decoder layer's pass plus the activations.

``pyobc.score(model, loader, method, blockwise=True)`` scores the decoder layers of a transformer (a
``nn.ModuleList`` or ``nn.Sequential`` whose every element holds one attention module pyobc knows, see
:func:`decoder_layers`) one layer at a time. Per batch:

1. one forward of the whole model without autograd records every layer's inputs (its hidden states and
   the other arguments the model passes it: rotary position embeddings, attention mask...) and output;
2. the gradient of the loss with respect to the last layer's output ``Y_L``: the model runs again with
   its layers replaced by their recorded outputs, so only the head (final norm, LM head, loss) is
   differentiated;
3. from the last layer down, layer ``l`` is scored on the *linearised loss through the rest of the
   model*

       L_l(theta_l) = mean_n <G_l[n], f_l(X_l[n]; theta_l)>,    G_l[n] = d loss_n / d Y_l[n]

   and ``G_{l-1} = J_{f_l}(X_l)^T G_l`` is one vector-Jacobian product through layer ``l``.

The gradient of ``L_l`` in ``theta_l``, per sample and per batch, is exactly the true loss's, so the
first-order criteria (``taylor``, ``jacobian``, ``obd``, and the data-free ``magnitude``) give the same
scores as :func:`pyobc.score` on the whole model. ``oba`` keeps, exactly, the Hessian terms that arise
inside each decoder layer (``H - GGN`` of the layer: attention's ``q k^T`` and ``A v`` products, SwiGLU's
``gate * up``, the norms), weighted by the true output gradient; it drops the blocks between layers and
the curvature of the later layers' nonlinearities — a layer-local surrogate, whose difference from the
whole-model scores ``tests/test_blockwise.py`` measures. Criteria whose second-order term is the
Gauss-Newton matrix (``sosp-h``, ``sosp-i``, ``ec``) or that measure the loss (``oracle``) have nothing
to see in a linearised loss and are refused.

Only the decoder layers' groups (attention heads, MLP neurons) are scored; the hidden width is never
pruned by these groups. Peak memory: the L+1 recorded hidden states of one batch, the head's pass on one
batch, and one layer's scoring pass.

Example:
    >>> import pyobc                                                          # doctest: +SKIP
    >>> model = pyobc.models.trained_lm("tiny-llama")                         # doctest: +SKIP
    >>> loader = pyobc.datasets.text("train", batch_size=4, seq_len=128)      # doctest: +SKIP
    >>> s = pyobc.score(model, loader, "jacobian", loss_fn=pyobc.losses.causal_lm, max_batches=2,
    ...                 blockwise=True)                                        # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from .attention_heads import head_layouts
from .errors import EmptyLoaderError
from .grouping import Group
from .model_state import preserved_state, unwrap_model
from .nested import map_tensors
from .progress import show_progress
from .scoring.batches import iter_batches, model_device
from .scoring.context import Batch, LossFn, default_loss_for
from .scoring.engine import feed, prepare
from .scoring.scores import Scores, model_signature

__all__ = ["EXACT_METHODS", "LAYER_LOCAL_METHODS", "decoder_layers", "score_blockwise"]

#: criteria whose block-by-block scores equal the whole-model scores
EXACT_METHODS = ("magnitude", "taylor", "jacobian", "obd")
#: criteria whose block-by-block scores keep the curvature inside each layer only
LAYER_LOCAL_METHODS = ("oba",)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The model's stack of transformer layers: the longest ``nn.ModuleList`` (or ``nn.Sequential``, timm's
    ``blocks``) whose every element holds exactly one attention module pyobc can cut by heads
    (:func:`pyobc.attention_heads.head_layouts`).

    Example:
        >>> import torch.nn as nn
        >>> decoder_layers(nn.Sequential(nn.Linear(2, 2)))
        Traceback (most recent call last):
        ...
        ValueError: Sequential has no stack of transformer layers pyobc knows (a ModuleList whose every element holds one attention module: Llama/Mistral/Qwen, GPT-2, BERT, timm ViT); score it with blockwise=False
    """
    best: tuple[str, nn.Module] | None = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) and all(len(head_layouts(layer)) == 1 for layer in m):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer layers pyobc knows (a ModuleList "
                         "whose every element holds one attention module: Llama/Mistral/Qwen, GPT-2, BERT, timm "
                         "ViT); score it with blockwise=False")
    return best


@dataclasses.dataclass
class _Call:
    """One recorded call of a decoder layer: its hidden states, its other arguments, its output."""

    x: torch.Tensor
    args: tuple
    kwargs: dict
    output: Any


def _hidden(output: Any) -> torch.Tensor:
    """A layer's hidden-state output: the tensor itself, or the first element of a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


class _Recorded(nn.Module):
    """Stands in for a decoder layer: returns its recorded output; other attributes are the layer's
    (models read per-layer attributes such as ``attention_type`` while they loop over their layers)."""

    def __init__(self, layer: nn.Module, output: Any):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_output", output)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output


class _Block(nn.Module):
    """One decoder layer called the way the model called it, for the scoring engine."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return _hidden(self.layer(x, *args, **kwargs))


def _linearised_loss(block: nn.Module, data: dict) -> torch.Tensor:
    """``mean_n <G[n], f(X[n])>``: the loss through the rest of the model, linearised at the layer output."""
    y = block(data["x"], data["args"], data["kwargs"])
    return (data["g"] * y).flatten(1).sum(1).mean()


@contextlib.contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """A Hugging Face model's key/value cache off (it would carry state from one call to the next)."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    try:
        yield
    finally:
        if use_cache:
            config.use_cache = use_cache


def _record(model: nn.Module, layers: nn.ModuleList, loss_fn: LossFn, data: Any) -> list[_Call]:
    """Every layer's call on one batch, from one forward without autograd."""
    calls: list[_Call | None] = [None] * len(layers)

    def hook(index: int):
        def record(module, args, kwargs, output):
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"pyobc's block-by-block scoring expects decoder layers called with the hidden "
                                f"states as first positional argument; {type(module).__name__} was not")
            detach = (lambda v: map_tensors(torch.Tensor.detach, v))
            calls[index] = _Call(args[0].detach(), detach(tuple(args[1:])), detach(dict(kwargs)), detach(output))
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), _no_cache(model):  # a cache in the recorded arguments would grow on every replay
            loss_fn(model, data)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not run on the batch: cannot score them block by block")
    return calls  # type: ignore[return-value]


def _output_gradient(model: nn.Module, layers: nn.ModuleList, calls: list[_Call], loss_fn: LossFn,
                     data: Any, size: int) -> torch.Tensor:
    """``d loss_n / d Y_L[n]`` for the last layer's output: the layers replaced by their recorded outputs."""
    last = _hidden(calls[-1].output).detach().requires_grad_(True)
    originals = list(layers)
    try:
        for i, (layer, call) in enumerate(zip(originals, calls)):
            out = _with_hidden(call.output, last) if i == len(layers) - 1 else call.output
            layers[i] = _Recorded(layer, out)
        with torch.enable_grad(), _no_cache(model):
            loss = loss_fn(model, data)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {float(loss)} on this batch")
            (grad,) = torch.autograd.grad(loss, [last])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return grad * size  # the loss is the mean over samples: per-sample gradients are N times the batch's


def _vjp(layer: nn.Module, call: _Call, grad: torch.Tensor) -> torch.Tensor:
    """``J_{f_l}(X_l)^T G_l``: the output gradient of the layer before, one backward through this one."""
    x = call.x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = _hidden(layer(x, *call.args, **call.kwargs))
        (gx,) = torch.autograd.grad(y, [x], grad)
    return gx


def _renamed(group: Group, prefix: str) -> Group:
    """``group`` (named inside a :class:`_Block`) with its names in the whole model."""
    name = (lambda n: prefix + n[len("layer."):] if n.startswith("layer.") else prefix + n)
    members = tuple(dataclasses.replace(
        m, module=name(m.module), slices=tuple(dataclasses.replace(s, param=name(s.param)) for s in m.slices))
        for m in group.members)
    return dataclasses.replace(group, root=name(group.root), members=members)


def _check_method(spec: Any, granularity: str) -> None:
    if spec.name not in EXACT_METHODS + LAYER_LOCAL_METHODS:
        raise ValueError(f"method {spec.name!r} cannot be scored block by block: its second-order term is the "
                         "Gauss-Newton matrix or the measured loss, which a loss linearised at each layer's output "
                         f"does not have; use one of {', '.join(EXACT_METHODS + LAYER_LOCAL_METHODS)}, or "
                         "blockwise=False")
    if granularity != "channel":
        raise ValueError("block-by-block scoring gives channel scores only (granularity='channel')")


def score_blockwise(spec: Any, model: nn.Module, loader: Iterable, *, loss_fn: LossFn,
                    max_batches: int | None = None, progress: bool | None = None, heads: str = "kv",
                    granularity: str = "channel", options: dict[str, Any] | None = None) -> Scores:
    """Score the decoder layers of ``model`` one at a time (see the module docstring) with the criterion
    class ``spec``; the arguments are those of :func:`pyobc.score`."""
    _check_method(spec, granularity)
    model = unwrap_model(model)
    loss_fn = loss_fn if loss_fn is not None else default_loss_for(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    prefix, layers = decoder_layers(model)
    device, t0 = model_device(model), time.perf_counter()
    criteria: list[Any] = [None] * len(layers)
    n_batches = n_samples = 0
    with preserved_state(model), _no_cache(model):
        for batch in iter_batches(loader, device, False, max_batches, show_progress(progress)):
            calls = _record(model, layers, loss_fn, batch.data)
            grad = _output_gradient(model, layers, calls, loss_fn, batch.data, batch.size)
            for i in reversed(range(len(layers))):
                b = Batch({"x": calls[i].x, "args": calls[i].args, "kwargs": calls[i].kwargs, "g": grad},
                          batch.size, batch.index)
                if criteria[i] is None:
                    criteria[i] = prepare(spec, _Block(layers[i]), b, loss_fn=_linearised_loss, example_inputs=None,
                                          move=False, device=device, granularity="channel", progress=progress,
                                          ignored_layers=(), heads=heads, options=dict(options or {}))
                if spec.needs_data:
                    feed(criteria[i], iter([b]), spec.name)
                if i:
                    grad = _vjp(layers[i], calls[i], grad)
            n_batches, n_samples = n_batches + 1, n_samples + batch.size
    if not n_batches:
        raise EmptyLoaderError("the loader yielded no batches")
    groups, values = [], []
    for i, criterion in enumerate(criteria):
        result = criterion.finalize()
        groups += [_renamed(g, f"{prefix}.{i}.") for g in criterion.ctx.groups]
        values += list(result.channel)
    return Scores(spec.name, groups, values, options=dict(options or {}, blockwise=True), batches=n_batches,
                  samples=n_samples, granularity="channel", signature=model_signature(model),
                  seconds=time.perf_counter() - t0)
