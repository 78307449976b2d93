"""Recording what chosen modules saw and produced during one forward pass.

Per-sample criteria (OBD, Jacobian rows of single samples, SOSP-I, elimination-compensation) need each
scored layer's input ``X``, output ``Y`` and the loss gradient ``G = dL/dY``. Forward hooks record ``X``
and ``Y``; ``G`` comes from one ``torch.autograd.grad`` call with respect to the recorded outputs (or, for
OBD, from hooks on them during one backward pass, see :mod:`pyobc.scoring.per_sample_pass`), which also
skips the weight-gradient work that ordinary backward passes do.

A later in-place operation (``ReLU(inplace=True)``, ``x += y``) would overwrite a recorded tensor.
:class:`Capture` notices through the tensors' version counters and the engine reruns the batch with the
affected modules' tensors cloned at record time, remembering them for the following batches.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Record", "Capture", "ModifiedInPlace", "modules_calling"]


class ModifiedInPlace(RuntimeError):
    """A recorded tensor was modified in place after it was recorded (internal; the engine retries)."""

    def __init__(self, names: set[str]):
        super().__init__(f"recorded activations of {sorted(names)} were modified in place")
        self.names = names


@dataclasses.dataclass
class Record:
    """One call of a module: its positional inputs, keyword inputs and tensor output(s)."""

    args: tuple
    kwargs: dict
    output: Any
    versions: tuple[int, ...]

    @property
    def x(self) -> torch.Tensor:
        """The first positional input (the activation for conv/linear/norm layers)."""
        return self.args[0]

    @property
    def y(self) -> torch.Tensor:
        """The first tensor output."""
        out = self.output
        return out[0] if isinstance(out, (tuple, list)) else out

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.args, *self.kwargs.values(), *_flat(self.output)) if isinstance(t, torch.Tensor)]


def _flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _stand_in(value: Any) -> Any:
    """``value`` with every tensor replaced by a meta-device tensor of its shape and dtype."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_stand_in(v) for v in value)
    return value


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class Capture:
    """Context manager recording calls of ``modules`` (name -> module) during forward passes.

    Modules in ``protect`` get their inputs and outputs cloned when recorded, so later in-place ops
    modify the copy the network goes on with, not the record.

    With ``on_output``, each call's first tensor output that needs grad is passed to
    ``on_output(name, call, output)`` when it is recorded (to register a gradient hook on it), and the
    record keeps meta-device stand-ins of the outputs (shapes and dtypes), not the outputs: an output that
    the backward does not save (a norm layer's, before a ReLU) is then freed as in a plain forward, instead
    of being held, with fresh pages for the next, to the end of the pass. In-place changes of the outputs
    are then not checked (the hook still receives the gradient of the value it was registered on).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> with Capture({"0": net[0]}) as cap:
        ...     y = net(torch.randn(2, 3, requires_grad=True))
        >>> cap.records["0"][0].y.shape
        torch.Size([2, 4])
    """

    def __init__(self, modules: Mapping[str, nn.Module], protect: Iterable[str] = (),
                 on_output: Callable[[str, int, torch.Tensor], Any] | None = None):
        self.modules = dict(modules)
        self.protect = set(protect)
        self.on_output = on_output
        self.records: dict[str, list[Record]] = {name: [] for name in self.modules}
        self._handles: list[Any] = []

    def __enter__(self) -> "Capture":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            if name in self.protect:
                return _clone(args), kwargs
            return None
        return hook

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            rec_out = output
            ret = None
            if name in self.protect:
                ret = _clone(output)  # the network continues with the clone
            rec = Record(tuple(args), dict(kwargs), rec_out, ())
            if self.on_output is not None:
                if isinstance(rec.y, torch.Tensor) and rec.y.requires_grad:
                    self.on_output(name, len(self.records[name]), rec.y)
                rec.output = _stand_in(rec_out)
            rec.versions = tuple(t._version for t in rec.tensors())
            self.records[name].append(rec)
            return ret
        return hook

    def check_intact(self) -> None:
        """Raise :class:`ModifiedInPlace` naming the modules whose records were overwritten."""
        bad = {name for name, recs in self.records.items() for r in recs
               if tuple(t._version for t in r.tensors()) != r.versions}
        if bad:
            raise ModifiedInPlace(bad)

    def outputs(self) -> list[tuple[str, int, torch.Tensor]]:
        """(module, call, first tensor output) for every recorded call whose output needs grad."""
        out = []
        for name, recs in self.records.items():
            for k, r in enumerate(recs):
                y = r.y
                if isinstance(y, torch.Tensor) and y.requires_grad:
                    out.append((name, k, y))
        return out


class _OpsByModule(TorchDispatchMode):
    """Records which aten ops run while each module (innermost first) is in its forward."""

    def __init__(self, stack: list[str], ops: set[str]):
        super().__init__()
        self.stack = stack
        self.ops = ops
        self.found: dict[str, None] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.ops and self.stack:
            self.found.setdefault(self.stack[-1])
        return func(*args, **(kwargs or {}))


def modules_calling(model: nn.Module, run: Callable[[], Any], ops: Iterable[str]) -> list[str]:
    """Names of the innermost modules of ``model`` whose forward runs one of the aten ``ops`` (e.g.
    ``"aten::hardsigmoid"``) during ``run()``; ``""`` stands for the model's own forward.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.Hardsigmoid())
        >>> modules_calling(net, lambda: net(torch.randn(2, 3)), ["aten::hardsigmoid"])
        ['1']
    """
    stack: list[str] = []
    handles = []
    def enter(module, args, name):
        stack.append(name)

    def leave(module, args, output):
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: enter(m, a, n)))
        handles.append(module.register_forward_hook(leave))
    mode = _OpsByModule(stack, set(ops))
    try:
        with torch.no_grad(), mode:
            run()
    finally:
        for h in handles:
            h.remove()
    return list(mode.found)
