"""The scoring loop shared by every criterion: arguments, devices, grouping, batches, and the result.

A criterion (see :mod:`pyobc.criteria`) only says what to accumulate from each batch and how to turn the
accumulators into scores; :func:`run` drives it so that the user's model comes back exactly as it was
(train/eval flags, parameters, ``.grad``) and every user mistake ends in a clear error. The public entry
point, :func:`pyobc.score` (:mod:`pyobc.api`), resolves the method name and calls :func:`run`.

The path of one call: check the arguments -> pick the device (a moved copy of the model if needed) ->
read the first batch -> trace the model on two of its samples and build the groups
(:mod:`pyobc.grouping`) -> a :class:`~pyobc.scoring.context.Context` -> ``criterion.update(batch)`` for
every batch -> data-parallel combine (:mod:`pyobc.distributed`; a no-op in one process) ->
``criterion.finalize()`` -> :class:`~pyobc.scoring.scores.Scores`.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import re
import time
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from ..distributed import Coordinator
from ..errors import EmptyLoaderError
from ..grouping import build_groups
from ..model_state import preserved_state, unwrap_model
from ..nested import map_tensors
from ..progress import show_progress
from .batches import first_forward, iter_batches, model_device, trace_inputs
from .capture import modules_calling
from .collector import young_collections_only
from .context import Batch, Context, LossFn, default_loss_for
from .per_sample import ChannelAxes, modules_to_probe, probe_channel_axes
from .scores import Scores, model_signature

__all__ = ["run", "prepare", "feed"]


def check_arguments(spec: Any, *, loader: Iterable | None, loss_fn: LossFn | None, example_inputs: Any,
                    max_batches: int | None, granularity: str) -> None:
    """Raise on every argument of :func:`pyobc.score` that cannot work with the criterion ``spec``."""
    if granularity not in ("channel", "weight"):
        raise ValueError(f"granularity must be 'channel' or 'weight', got {granularity!r}")
    if granularity not in spec.granularities:
        raise ValueError(f"method {spec.name!r} does not support granularity={granularity!r} "
                         f"(supported: {', '.join(spec.granularities)})")
    if max_batches is not None and (not isinstance(max_batches, int) or isinstance(max_batches, bool)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if loader is None and spec.needs_data:
        raise ValueError(f"method {spec.name!r} needs data: pass a loader")
    if loader is None and example_inputs is None:
        raise ValueError("pass a loader or example_inputs so pyobc can trace the model's coupled layers")


def placement(model: nn.Module, device: str | torch.device | None) -> tuple[nn.Module, torch.device, bool]:
    """(the model to run, the scoring device, whether batches must be moved there).

    Without ``device`` the model's own device is used and batches must already be there. With it, a
    model living elsewhere is deep-copied there: the user's model is never moved.
    """
    here = model_device(model)
    if device is None:
        return model, here, False
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return (model if here == device else copy.deepcopy(model).to(device)), device, True


#: PyTorch's messages for an op without a derivative: "derivative for aten::X is not implemented",
#: "the derivative for 'X' is not implemented."
_NO_DERIVATIVE = re.compile(r"derivative for '?(?:aten::)?([\w.]+?)'? is not implemented")


def _missing_derivative(exc: RuntimeError, method: str, ctx: Context, batch: Batch) -> NotImplementedError | None:
    """A pyobc error naming the method, the op and the modules that call it, for PyTorch's error about
    an op without a (double) backward; None for any other error."""
    found = _NO_DERIVATIVE.search(str(exc))
    if found is None:
        return None
    op = "aten::" + found.group(1)
    forward_op = op[: -len("_backward")] if op.endswith("_backward") else op
    candidates = {op, forward_op, forward_op + "_forward", forward_op.replace("::_", "::")}
    try:
        names = modules_calling(ctx.model, lambda: ctx.loss(batch), candidates)
    except Exception:  # the diagnosis must not hide the error it explains
        names = []
    where = ", ".join(f"{n or '<model>'} ({type(ctx.modules[n]).__name__})" for n in names) or "an unknown layer"
    return NotImplementedError(
        f"method {method!r} differentiates twice, but PyTorch implements no derivative of {op} (the backward "
        f"of an op in {where}): use a first-order method (jacobian, taylor, obd, ec) or replace that op")


def feed(criterion: Any, batches: Iterator[Batch], method: str) -> tuple[int, int]:
    """``criterion.update`` on every batch; the batch and sample counts."""
    n_batches = n_samples = 0
    for batch in batches:
        # no full collections in the middle of a pass, from the second batch on: the first one makes
        # torch's lazy initialisations (forward-mode decompositions, parsed schemas), whose cyclic garbage
        # holds tensors that the collector should free as usual
        paused = young_collections_only() if n_batches else contextlib.nullcontext()
        try:
            with paused:
                criterion.update(batch)
        except RuntimeError as exc:
            error = _missing_derivative(exc, method, criterion.ctx, batch)
            if error is None:
                raise
            raise error from exc
        n_batches += 1
        n_samples += batch.size
    return n_batches, n_samples


def _tracer_inputs(model: nn.Module, loss_fn: LossFn, first: Batch | None, example_inputs: Any, move: bool,
                   device: torch.device) -> tuple[Any, Any]:
    """(example inputs, forward function) for the tracer (on the scoring device)."""
    forward_fn = None
    if example_inputs is None:
        example_inputs, forward_fn = trace_inputs(model, loss_fn, first)
    elif move:
        example_inputs = map_tensors(lambda t: t.to(device), example_inputs)
    return example_inputs, forward_fn


def _channel_axes(model: nn.Module, example_inputs: Any, forward_fn: Any, source: str) -> ChannelAxes:
    """Run the model once on the tracer's inputs, so that a model that cannot take the data fails with one
    line before tracing, and measure the channel axes of layers with their own ``forward`` (see
    :func:`~pyobc.scoring.per_sample.probe_channel_axes`)."""
    watch = modules_to_probe(model)
    cap = first_forward(model, example_inputs, forward_fn, watch, source)
    return probe_channel_axes(watch, cap.records)


def prepare(spec: Any, work_model: nn.Module, first: Batch | None, *, loss_fn: LossFn, example_inputs: Any,
            move: bool, device: torch.device, granularity: str, progress: bool | None,
            ignored_layers: Sequence[nn.Module | str], heads: str, options: dict[str, Any],
            hidden: bool = False) -> Any:
    """The criterion ``spec`` set up on ``work_model`` (already placed, in eval mode): tracer inputs from
    ``first`` (or ``example_inputs``), a first forward that fails with one line on bad inputs, the groups,
    the :class:`~pyobc.scoring.context.Context`. :func:`run` and block-by-block scoring
    (:mod:`pyobc.blockwise`) both start here."""
    user_inputs = example_inputs
    example_inputs, forward_fn = _tracer_inputs(work_model, loss_fn, first, example_inputs, move, device)
    source = "two samples of the first batch" if user_inputs is None else "example_inputs"
    axes = _channel_axes(work_model, example_inputs, forward_fn, source)
    called: set[str] = set()
    groups = build_groups(work_model, example_inputs, ignored_layers=ignored_layers, heads=heads, hidden=hidden,
                          forward_fn=forward_fn, called=called, progress=show_progress(progress))
    ctx = Context(work_model, groups, loss_fn, device, granularity, called=called,
                  progress=show_progress(progress), channel_axes=axes)
    return spec(ctx, **options)


def run(spec: Any, model: nn.Module, loader: Iterable | None, *, coordinator: Coordinator,
        loss_fn: LossFn | None = None, example_inputs: Any = None, max_batches: int | None = None,
        device: str | torch.device | None = None, granularity: str = "channel", progress: bool | None = None,
        ignored_layers: Sequence[nn.Module | str] = (), heads: str = "kv", hidden: bool = False,
        options: dict[str, Any] | None = None) -> Scores:
    """Score ``model`` with the criterion class ``spec``; the arguments are those of :func:`pyobc.score`."""
    check_arguments(spec, loader=loader, loss_fn=loss_fn, example_inputs=example_inputs,
                    max_batches=max_batches, granularity=granularity)
    options = dict(options or {})
    model = unwrap_model(model)
    loss_fn = loss_fn or default_loss_for(model)
    work_model, device, move = placement(model, device)
    t0 = time.perf_counter()
    with preserved_state(work_model), torch.enable_grad():
        batches = (iter_batches(loader, device, move, max_batches, show_progress(progress))
                   if loader is not None else iter(()))
        first = next(batches, None)
        if loader is not None and first is None:
            raise EmptyLoaderError("the loader yielded no batches")
        criterion = prepare(spec, work_model, first, loss_fn=loss_fn, example_inputs=example_inputs, move=move,
                            device=device, granularity=granularity, progress=progress,
                            ignored_layers=ignored_layers, heads=heads, options=options, hidden=hidden)
        groups = criterion.ctx.groups
        counts = (feed(criterion, itertools.chain([first], batches), spec.name)
                  if spec.needs_data else (0, 0))
        # data-parallel: agree with the other ranks, sum the accumulators (no-op in one process)
        n_batches, n_samples = coordinator.combine(criterion, *counts, method=spec.name, groups=groups,
                                                   first=first)
        result = criterion.finalize()
    return Scores(
        spec.name, groups, result.channel, options=options, batches=n_batches, samples=n_samples,
        granularity=granularity, parameter_scores=result.parameter if granularity == "weight" else None,
        extras=result.extras, signature=model_signature(model), seconds=time.perf_counter() - t0)
