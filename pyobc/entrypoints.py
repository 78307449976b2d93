"""The user's model, data and loss for the command line: ``pkg.module:function`` or ``file.py:function``.

An entry point names a function that takes no arguments and returns the object (a module-level object
is used as it is). The command line calls :func:`model_from`, :func:`loader_from` and :func:`loss_from`;
every mistake in a spec (module or file not found, attribute missing, wrong return type, the function
failing) is an :class:`EntryPointError` whose message is one line.

Example:
    >>> from pyobc.entrypoints import load_entry_point
    >>> load_entry_point("os.path:sep", "separator") in ("/", "\\\\")
    True
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch.nn as nn

__all__ = ["EntryPointError", "load_entry_point", "model_from", "loader_from", "loss_from", "first_batch",
           "example_inputs_of"]


class EntryPointError(ValueError):
    """A spec that does not give the object it should; the message is one line."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_file(path: Path):
    if not path.is_file():
        raise EntryPointError(f"no such file: {os.fspath(path)!r}")
    # the file's folder goes first on sys.path so that it can import its neighbours, as `python file.py` would
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "_pyobc_entry_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EntryPointError(f"cannot import {os.fspath(path)!r} (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's own code failed: one line, the traceback is theirs to ask for
        del sys.modules[name]
        raise EntryPointError(f"importing {os.fspath(path)!r} failed: {_one_line(exc)}") from exc
    return module


def _import_module(name: str):
    # a console script does not put the working directory on sys.path (`python -m` does); entry points
    # such as `mypkg.models:build` are meant relative to it, as in uvicorn or gunicorn
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise EntryPointError(f"no module named {exc.name!r} (from {name!r}; is it installed, or run "
                                  f"from the folder that contains it?)") from exc
        raise EntryPointError(f"importing {name!r} failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise EntryPointError(f"importing {name!r} failed: {_one_line(exc)}") from exc


def _resolve(spec: str, what: str) -> Any:
    """The attribute a ``module:attr`` or ``path/file.py:attr`` spec names (not called)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise EntryPointError(f"{what}: expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    where, _, attr = spec.rpartition(":")  # the last colon, so Windows drive letters survive
    if not where or not attr or not attr.replace(".", "_").isidentifier():
        raise EntryPointError(f"{what}: expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    module = _import_file(Path(where)) if is_file else _import_module(where)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise EntryPointError(f"{what}: {where!r} has no attribute {attr!r}") from None
    return obj


def load_entry_point(spec: str, what: str) -> Any:
    """The object a ``module:attr`` or ``path/file.py:attr`` spec names: ``attr()`` if it is a function or
    class, else ``attr`` itself. ``what`` names the object in error messages.

    Example:
        >>> load_entry_point("collections:OrderedDict", "mapping")
        OrderedDict()
    """
    obj = _resolve(spec, what)
    # nn.Module instances are callable (their forward), but a module-level model is the object itself
    if callable(obj) and not isinstance(obj, nn.Module):
        try:
            obj = obj()
        except Exception as exc:
            raise EntryPointError(f"{what}: calling {spec}() failed: {_one_line(exc)}") from exc
    return obj


def model_from(spec: str) -> nn.Module:
    """The ``nn.Module`` returned by the entry point ``spec``.

    Example:
        >>> model_from("torch.nn:Identity")
        Identity()
    """
    model = load_entry_point(spec, "--model")
    if not isinstance(model, nn.Module):
        raise EntryPointError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def loader_from(spec: str, option: str = "--data") -> Iterable:
    """The iterable of batches returned by the entry point ``spec`` (a DataLoader, a list...).

    Example:
        >>> loader_from("builtins:list")
        []
    """
    loader = load_entry_point(spec, option)
    if isinstance(loader, (str, bytes, dict)) or not hasattr(loader, "__iter__") or hasattr(loader, "dim"):
        raise EntryPointError(f"{option} {spec} returned {type(loader).__name__}, not an iterable of batches "
                              "(e.g. a torch.utils.data.DataLoader)")
    return loader


def loss_from(spec: str) -> Callable:
    """The loss function ``loss_fn(model, batch) -> scalar`` that ``spec`` names (not called: the function
    is the loss itself; it must return the mean over the batch's samples).

    Example:
        >>> loss_from("torch.nn.functional:cross_entropy").__name__
        'cross_entropy'
    """
    fn = _resolve(spec, "--loss")
    if not callable(fn):
        raise EntryPointError(f"--loss {spec} is a {type(fn).__name__}, not a function loss_fn(model, batch)")
    return fn


def first_batch(loader: Iterable, option: str = "--data") -> Any:
    """The loader's first batch (EntryPointError if it yields none).

    Example:
        >>> first_batch([(1, 2)])
        (1, 2)
    """
    try:
        return next(iter(loader))
    except StopIteration:
        raise EntryPointError(f"{option}: the loader yielded no batches") from None
    except Exception as exc:
        raise EntryPointError(f"{option}: reading the first batch failed: {_one_line(exc)}") from exc


def example_inputs_of(batch: Any, limit: int = 2) -> Any:
    """The model inputs of a batch: the first element of an ``(inputs, targets)`` pair, else the batch;
    tensors are cut to ``limit`` samples (tracing and MAC counts do not depend on the batch size).

    Example:
        >>> import torch
        >>> example_inputs_of((torch.zeros(8, 3), torch.zeros(8))).shape
        torch.Size([2, 3])
    """
    inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
    if hasattr(inputs, "dim") and inputs.dim() > 0:
        inputs = inputs[:limit]
    return inputs
