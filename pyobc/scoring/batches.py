"""Reading the user's loader: batches moved to (or checked against) the scoring device, and the model
inputs the dependency tracer needs.

Example:
    >>> import torch
    >>> from pyobc.scoring.batches import iter_batches
    >>> data = [(torch.ones(4, 3), torch.zeros(4, dtype=torch.long))]
    >>> [(b.index, b.size) for b in iter_batches(data, torch.device("cpu"), move=False)]
    [(0, 4)]
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from ..errors import ModelRunError
from ..nested import map_tensors, tensors_in
from ..progress import progress_bar
from .capture import Capture
from .context import Batch, LossFn, default_loss, is_labelled_dict

__all__ = ["model_device", "iter_batches", "trace_inputs", "first_forward", "describe_inputs"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _length(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def _on_device(data: Any, index: int, device: torch.device, move: bool) -> Any:
    tensors = tensors_in(data)
    if not tensors:
        raise TypeError(f"batch {index} holds no tensors (got {type(data).__name__})")
    if move:
        return map_tensors(lambda t: t.to(device, non_blocking=True), data)
    for t in tensors:
        if t.device != device:
            raise ValueError(
                f"batch {index} has a tensor on {t.device} but the model is on {device}: move the "
                f"data, or pass device= to score on one device")
    return data


def iter_batches(loader: Iterable, device: torch.device, move: bool, max_batches: int | None = None,
                 progress: bool = False) -> Iterator[Batch]:
    """The loader's batches as :class:`Batch` records on ``device`` (moved there if ``move``, else checked)."""
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(f"loader must be an iterable of batches (e.g. a DataLoader), got {type(loader).__name__}") from None
    bar = progress_bar(None, progress, total=_length(loader, max_batches), desc="pyobc scoring", unit="batch",
                       leave=False)
    try:
        for i, data in enumerate(iterator):
            if max_batches is not None and i >= max_batches:
                break
            data = _on_device(data, i, device, move)
            first = tensors_in(data)[0]
            yield Batch(data, int(first.shape[0]) if first.dim() > 0 else 1, i)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _inputs_seen_by_model(model: nn.Module, loss_fn: LossFn, batch: Batch) -> tuple[Any, Callable | None]:
    """What ``loss_fn`` passes to the model for ``batch``: (inputs, None), or (None, forward_fn) when
    the model is called with keyword arguments."""
    seen: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append((args, kwargs))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            loss_fn(model, batch.data)
    except Exception as exc:
        raise _failed(f"loss_fn(model, batch) with the model {type(model).__name__}", batch.data, exc,
                      "two samples of the first batch") from exc
    finally:
        handle.remove()
    if not seen:
        raise ValueError("loss_fn never called the model: pyobc cannot find the model's inputs; pass example_inputs")
    args, kwargs = seen[0]
    if kwargs:
        return None, (lambda m, _x: m(*args, **kwargs))
    return (args[0] if len(args) == 1 else args), None


def trace_inputs(model: nn.Module, loss_fn: LossFn, first: Batch) -> tuple[Any, Callable | None]:
    """Inputs for the dependency tracer from the first batch, and a forward function when the model
    takes keyword arguments.

    Two samples are enough: the dependency graph does not depend on the batch size, and a full batch
    would cost a full forward's memory.
    """
    probe = first.split(2)[0]
    if loss_fn is default_loss and not is_labelled_dict(first.data):
        if not (isinstance(first.data, (tuple, list)) and len(first.data) == 2):
            raise TypeError("batches must be (inputs, targets) pairs or dicts with a 'labels' entry for the "
                            f"default cross-entropy loss (got {type(first.data).__name__}"
                            + (f" with keys {sorted(map(str, first.data))}" if isinstance(first.data, Mapping) else "")
                            + "); pass loss_fn for other shapes")
        return probe.data[0], None
    return _inputs_seen_by_model(model, loss_fn, probe)


def describe_inputs(inputs: Any) -> str:
    """The shapes of the tensors in ``inputs``, for error messages.

    Example:
        >>> describe_inputs((torch.zeros(2, 3), {"mask": torch.ones(2)}))
        '(2, 3), (2,)'
    """
    shapes = [tuple(t.shape) for t in tensors_in(inputs)]
    return ", ".join(str(s) for s in shapes) if shapes else "no tensors"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _failed(what: str, inputs: Any, exc: BaseException, source: str) -> ModelRunError:
    return ModelRunError(f"running {what} on inputs of shape {describe_inputs(inputs)} ({source}) failed: "
                      f"{_one_line(exc)}")


def _call(model: nn.Module, example_inputs: Any, forward_fn: Callable | None) -> Any:
    """Call the model the way the dependency tracer will."""
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def first_forward(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None,
                  watch: dict[str, nn.Module] | None = None, source: str = "two samples of the first batch") -> Capture:
    """Run the model once on the tracer's inputs (no grad), recording the calls of ``watch``.

    Any exception the model raises becomes one :class:`~pyobc.errors.ModelRunError` (a ``ValueError``)
    naming the model, the input shapes, where they come from (``source``) and the original error
    (chained), before the tracer would bury it under its own frames.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> first_forward(net, torch.zeros(2, 4))
        Traceback (most recent call last):
        ...
        pyobc.errors.ModelRunError: running the model Linear on inputs of shape (2, 4) (two samples of the first batch) failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x4 and 3x2)
    """
    watch = dict(watch or {})
    cap = Capture(watch, protect=watch)
    try:
        with cap, torch.no_grad():
            _call(model, example_inputs, forward_fn)
    except Exception as exc:
        raise _failed(f"the model {type(model).__name__}", example_inputs, exc, source) from exc
    return cap
