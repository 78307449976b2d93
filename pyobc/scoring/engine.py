"""The scoring loop shared by every criterion: data, devices, loss, model state, and the result.

A criterion (see :mod:`pyobc.criteria`) only says what to accumulate from each batch and how to turn the
accumulators into scores; this module runs it so that the user's model comes back exactly as it was
(train/eval flags, parameters, ``.grad``) and every user mistake ends in a clear error.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import EmptyLoaderError
from ..grouping import Group, build_groups, preserved_state, unwrap_model
from ..scores import Scores, model_signature
from .capture import Capture, ModifiedInPlace
from .layout import Layout

__all__ = ["Batch", "Context", "score", "default_loss"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of ``model(inputs)`` against ``targets`` for ``(inputs, targets)`` batches."""
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def _tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_tree_map(fn, o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, o) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _tree_map(lambda t: found.append(t), obj)
    return found


@dataclasses.dataclass
class Batch:
    """One batch as the loader yielded it (moved to the scoring device) and its sample count."""

    data: Any
    size: int
    index: int

    def split(self, size: int) -> list["Batch"]:
        """Micro-batches of at most ``size`` samples: every tensor whose leading dim is the batch size
        is sliced along it; everything else is shared."""
        if size >= self.size:
            return [self]

        def part(start: int, stop: int) -> Any:
            return _tree_map(lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == self.size else t, self.data)

        return [Batch(part(i, min(i + size, self.size)), min(i + size, self.size) - i, self.index)
                for i in range(0, self.size, size)]


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class Context:
    """What a criterion sees: the model, its groups and layout, and helpers to run batches.

    ``params`` are detached leaves that share storage with the model's parameters and require grad,
    substituted with ``torch.func.functional_call``: gradients flow to them, never to the model's
    own parameters or their ``.grad``.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Group], loss_fn: LossFn, device: torch.device,
                 granularity: str, called: set[str] | None = None, progress: bool = False):
        self.model = model
        self.groups = list(groups)
        self.loss_fn = loss_fn
        self.device = device
        self.granularity = granularity
        self.progress = progress  # criteria with long inner loops may show their own bar
        self.params: dict[str, torch.Tensor] = {
            n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
        self.layout = Layout(self.groups, self.params)
        self.modules = dict(model.named_modules())
        #: modules whose forward runs (hooks on the others would never fire); None = unknown, assume all
        self.called = set(self.modules) if called is None else set(called)
        self._loss_module = _LossModule(model, loss_fn)
        self._protect: set[str] = set()
        self._separable_checked = False

    # -- parameters ----------------------------------------------------------------------------------
    @property
    def theta(self) -> dict[str, torch.Tensor]:
        """Parameter values (no grad) by qualified name."""
        return {n: p.detach() for n, p in self.params.items()}

    def member_params(self) -> list[str]:
        """Every parameter some group touches, in layout order."""
        return self.layout.params

    # -- micro-batches -------------------------------------------------------------------------------
    def micro_batches(self, batch: Batch, size: int | None) -> list[tuple[Batch, float]]:
        """``batch`` as micro-batches of at most ``size`` samples with their weights ``n_i / N``.

        Criteria that differentiate twice use this to bound memory: for a loss that is the mean of
        per-sample terms (and a model in eval mode, where samples do not interact), every quantity they
        accumulate is the weighted sum over micro-batches. That assumption is checked once, on the
        first split batch, by comparing the loss with the weighted sum of the micro-batch losses.
        """
        if size is None or size >= batch.size:
            return [(batch, 1.0)]
        parts = batch.split(size)
        if not self._separable_checked:
            with torch.no_grad():
                whole = self.loss(batch).double()
                pieced = sum(self.loss(p).double() * (p.size / batch.size) for p in parts)
            tol = 1e-5 * max(1.0, abs(float(whole)))
            if abs(float(whole) - float(pieced)) > tol:
                raise ValueError(
                    f"micro-batching needs a loss that is the mean of per-sample terms, but the loss of "
                    f"batch {batch.index} ({float(whole):.6g}) differs from the size-weighted mean of its "
                    f"micro-batch losses ({float(pieced):.6g}); pass micro_batch=None")
            self._separable_checked = True
        return [(p, p.size / batch.size) for p in parts]

    # -- running the model ---------------------------------------------------------------------------
    def loss(self, batch: Batch, params: Mapping[str, torch.Tensor] | None = None,
             outputs: list | None = None) -> torch.Tensor:
        """The batch loss with ``params`` (default: :attr:`params`) substituted into the model.

        With ``outputs`` given, the model's outputs of this call are appended to it (for criteria that
        linearise the loss around the logits).
        """
        params = self.params if params is None else params
        handle = None
        if outputs is not None:
            handle = self.model.register_forward_hook(lambda m, a, out: outputs.append(out))
        try:
            loss = torch.func.functional_call(
                self._loss_module, {f"model.{k}": v for k, v in params.items()}, (batch.data,), strict=False)
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        loss = loss.reshape(())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"the loss of batch {batch.index} is {loss.item()}: scores would be meaningless; "
                "check the data and the model (a diverged model or unnormalised inputs)")
        return loss

    def capture_forward(self, batch: Batch, modules: Mapping[str, nn.Module],
                        params: Mapping[str, torch.Tensor] | None = None,
                        outputs: list | None = None) -> tuple[torch.Tensor, Capture]:
        """Run :meth:`loss` while recording the calls of ``modules`` (see :class:`Capture`).

        If a later in-place op overwrote a record, the batch is run again with those modules' tensors
        cloned, and they stay protected for the following batches.
        """
        for _ in range(2):
            cap = Capture(modules, protect=self._protect & set(modules))
            out_list: list = [] if outputs is not None else None
            with cap:
                loss = self.loss(batch, params, out_list)
            try:
                cap.check_intact()
            except ModifiedInPlace as e:
                if e.names <= self._protect:
                    raise RuntimeError(f"activations of {sorted(e.names)} change in place in a way pyobc "
                                       "cannot protect against") from None
                self._protect |= e.names
                continue
            if outputs is not None:
                outputs.extend(out_list)
            return loss, cap
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------
# data


def _first_param_device(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _iter_batches(loader: Iterable, device: torch.device, move: bool, max_batches: int | None,
                  progress: bool) -> Iterator[Batch]:
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(f"loader must be an iterable of batches (e.g. a DataLoader), got {type(loader).__name__}") from None
    total = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="pyobc scoring", unit="batch", file=sys.stderr, leave=False)
    try:
        for i, data in enumerate(iterator):
            if max_batches is not None and i >= max_batches:
                break
            tensors = _tensors(data)
            if not tensors:
                raise TypeError(f"batch {i} holds no tensors (got {type(data).__name__})")
            if move:
                data = _tree_map(lambda t: t.to(device, non_blocking=True), data)
            else:
                for t in tensors:
                    if t.device != device:
                        raise ValueError(
                            f"batch {i} has a tensor on {t.device} but the model is on {device}: move the "
                            f"data, or pass device= to score on one device")
            size = int(tensors[0].shape[0]) if tensors[0].dim() > 0 else 1
            yield Batch(data, size, i)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _example_inputs(model: nn.Module, loss_fn: LossFn, batch: Batch) -> tuple[Any, Callable | None]:
    """Inputs for the dependency tracer: what ``loss_fn`` passes to the model for the first batch."""
    seen: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append((args, kwargs))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            loss_fn(model, batch.data)
    finally:
        handle.remove()
    if not seen:
        raise ValueError("loss_fn never called the model: pyobc cannot find the model's inputs; pass example_inputs")
    args, kwargs = seen[0]
    if kwargs:
        return None, (lambda m, _x: m(*args, **kwargs))
    return (args[0] if len(args) == 1 else args), None


# ---------------------------------------------------------------------------------------------------
# the public entry point


def score(
    model: nn.Module,
    loader: Iterable | None,
    method: str = "jacobian",
    *,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    granularity: str = "channel",
    progress: bool | None = None,
    ignored_layers: Sequence[nn.Module | str] = (),
    distributed: Any = None,
    **options: Any,
) -> Scores:
    """Score every prunable channel group of ``model`` with a criterion; higher = more important.

    Args:
        model: any ``nn.Module`` (DDP / ``torch.compile`` wrappers are looked through). It is not
            changed: its train/eval flags, parameters and ``.grad`` are the same afterwards. Scoring runs
            it in eval mode (BatchNorm uses its running statistics, dropout is off).
        loader: iterable of batches; ``(inputs, targets)`` pairs unless ``loss_fn`` is given. Data-free
            criteria (``magnitude``) accept ``None`` with ``example_inputs``.
        method: a name from :func:`pyobc.methods` (``jacobian`` by default).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for other batch shapes; it must be the *mean* over
            the batch's samples (per-sample criteria rely on it). Default: cross-entropy.
        example_inputs: inputs for tracing the coupled layers; default: the first batch's inputs.
        max_batches: stop after this many batches.
        device: score on this device: batches are moved there, and if the model lives elsewhere a copy
            of it is moved there (the original is untouched). Default: the model's device, with an
            error if a batch lives elsewhere.
        granularity: ``"channel"`` (groups) or ``"weight"`` (per-parameter scores, for the criteria that
            define them; see :meth:`Scores.by_parameter`).
        progress: tqdm progress bar over batches; default on only when stderr is a terminal.
        ignored_layers: modules (or names) whose out-channels must not be pruned.
        distributed: data-parallel scoring (see ``docs/distributed.md``). ``None`` (default): when
            ``torch.distributed`` is initialised with more than one process, each rank scores its own
            loader (its shard, e.g. :func:`pyobc.distributed.sharded_loader`) and the accumulators are
            summed across ranks, so every rank returns the same scores; any error or mismatched
            configuration on one rank raises on every rank. ``False``: score this rank's loader alone,
            with no communication. ``True``: like ``None`` but require an initialised process group. A
            ``ProcessGroup``: combine over that group.
        **options: criterion options (see ``pyobc.methods()[name]``).

    Example:
        >>> import pyobc
        >>> model = pyobc.models.resnet20(num_classes=10, in_channels=1, input_size=16)
        >>> loader = pyobc.datasets.digits("train", batch_size=64, image_size=16, channels=1)
        >>> scores = pyobc.score(model, loader, "jacobian", max_batches=2)   # doctest: +SKIP
        >>> scores.by_module()["conv1"].shape                                   # doctest: +SKIP
        torch.Size([16])
    """
    from ..distributed import Coordinator

    coord = Coordinator(distributed)
    try:
        return _score(coord, model, loader, method, loss_fn=loss_fn, example_inputs=example_inputs,
                      max_batches=max_batches, device=device, granularity=granularity, progress=progress,
                      ignored_layers=ignored_layers, options=options)
    except Exception as exc:
        coord.fail(exc)  # data-parallel: the other ranks raise too instead of waiting in a collective
        raise


def _score(coord: Any, model: nn.Module, loader: Iterable | None, method: str, *, loss_fn: LossFn | None,
           example_inputs: Any, max_batches: int | None, device: str | torch.device | None, granularity: str,
           progress: bool | None, ignored_layers: Sequence[nn.Module | str], options: dict[str, Any]) -> Scores:
    from ..criteria import get_method

    spec = get_method(method)
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
    model = unwrap_model(model)
    if loader is None and spec.needs_data:
        raise ValueError(f"method {spec.name!r} needs data: pass a loader")
    if loader is None and example_inputs is None:
        raise ValueError("pass a loader or example_inputs so pyobc can trace the model's coupled layers")
    loss_fn = loss_fn or default_loss
    if progress is None:
        progress = sys.stderr.isatty()

    model_device = _first_param_device(model)
    work_model = model
    move = device is not None
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if model_device != device:
            work_model = copy.deepcopy(model).to(device)
    else:
        device = model_device

    t0 = time.perf_counter()
    with preserved_state(work_model), torch.enable_grad():
        batches = _iter_batches(loader, device, move, max_batches, progress) if loader is not None else iter(())
        first = next(batches, None)
        if loader is not None and first is None:
            raise EmptyLoaderError("the loader yielded no batches")
        if example_inputs is None:
            # trace on two samples of the first batch: the dependency graph does not depend on the
            # batch size, and a full batch would cost a full forward's memory
            probe = first.split(2)[0]
            if loss_fn is default_loss:
                if not (isinstance(first.data, (tuple, list)) and len(first.data) == 2):
                    raise TypeError("batches must be (inputs, targets) pairs for the default cross-entropy "
                                    f"loss (got {type(first.data).__name__}); pass loss_fn for other shapes")
                example_inputs, forward_fn = probe.data[0], None
            else:
                example_inputs, forward_fn = _example_inputs(work_model, loss_fn, probe)
        else:
            forward_fn = None
            if move:
                example_inputs = _tree_map(lambda t: t.to(device), example_inputs)
        called: set[str] = set()
        groups = build_groups(work_model, example_inputs, ignored_layers=ignored_layers, forward_fn=forward_fn,
                              called=called)
        ctx = Context(work_model, groups, loss_fn, device, granularity, called=called, progress=progress)
        criterion = spec(ctx, **options)
        n_batches = n_samples = 0
        if spec.needs_data:
            for batch in itertools.chain([first], batches):
                criterion.update(batch)
                n_batches += 1
                n_samples += batch.size
        # data-parallel: agree with the other ranks, sum the accumulators (no-op in a single process)
        n_batches, n_samples = coord.combine(criterion, n_batches, n_samples, method=spec.name, groups=groups,
                                             first=first)
        result = criterion.finalize()
    return Scores(
        spec.name, groups, result.channel, options=options, batches=n_batches, samples=n_samples,
        granularity=granularity, parameter_scores=result.parameter if granularity == "weight" else None,
        extras=result.extras, signature=model_signature(model), seconds=time.perf_counter() - t0)
