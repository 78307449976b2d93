"""The pruning plan: how to turn a freshly built model into a pruned one, saved with its weights.

Every physical prune appends one entry to ``model.pyobc_plan`` (a list, copied with the model):

* ``signature``: parameter name -> shape before this step (to check a replay starts from the same model);
* ``keep``: group root -> the root channels kept (int64 tensor);
* ``groups``: the :class:`~pyobc.grouping.Group` records of the pruned groups (plain dicts of tensors);
* ``example_inputs``: one sample of the inputs the caller gave (or None), to rebuild the groups.

:func:`save` writes ``{"format", "plan", "state_dict"}`` with ``torch.save``; everything in it is a tensor,
number, string, list, tuple or dict, so it loads with ``torch.load(path, weights_only=True)``. :func:`load` replays
the plan on a freshly built model of the original architecture: for each entry it rebuilds the groups on the
model as it is at that point (from the saved or given example inputs; from the saved group records when
there are none), cuts the same channels with :func:`~pyobc.pruning.slicing.apply_keep`, and finally loads
the weights.
"""
from __future__ import annotations

import io
import os
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..grouping import Group, build_groups
from ..model_state import unwrap_model
from ..nested import map_tensors
from ..scoring.scores import model_signature
from .adapters import OBCAdapted
from .slicing import apply_keep

__all__ = ["PLAN_ATTR", "record", "plan_of", "save", "load", "replay"]

_FORMAT = "pyobc.pruned/1"
#: the model attribute holding the plan
PLAN_ATTR = "pyobc_plan"


def plan_of(model: nn.Module) -> list[dict[str, Any]]:
    """The plan attached to ``model`` (an empty list for a model that was never pruned)."""
    return list(getattr(unwrap_model(model), PLAN_ATTR, []))


def _loads_back(obj: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``obj`` back: :func:`load` must be able to read
    every plan that :func:`save` writes, whatever else the caller's inputs held."""
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def _one_sample(example_inputs: Any) -> Any:
    """The first sample of each tensor of ``example_inputs`` (on the CPU, same nesting), to rebuild the groups
    when the plan is replayed; None when there are no inputs or they would not load back."""
    if example_inputs is None:
        return None
    sample = map_tensors(lambda t: (t[:1] if t.dim() else t).detach().cpu().clone(), example_inputs)
    return sample if _loads_back(sample) else None


def record(model: nn.Module, signature: dict[str, tuple[int, ...]], groups: Sequence[Group],
           keep: dict[str, torch.Tensor], example_inputs: Any = None) -> None:
    """Append one prune step to ``model``'s plan (only groups that lost channels are stored)."""
    by_root = {g.root: g for g in groups}
    keep = {r: torch.as_tensor(k, dtype=torch.long).cpu().clone() for r, k in keep.items()
            if int(torch.as_tensor(k).numel()) < by_root[r].size}
    if not keep:
        return
    entry = {
        "signature": {k: list(v) for k, v in signature.items()},
        "keep": keep,
        "groups": [by_root[r].to_dict() for r in keep],
        "example_inputs": _one_sample(example_inputs),
    }
    setattr(model, PLAN_ATTR, plan_of(model) + [entry])


def _check_plain(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, OBCAdapted):
            raise ValueError(f"{name!r} still has Equivalent Pruning adapters: call pyobc.fold(model) before saving")
        if parametrize.is_parametrized(m):
            raise ValueError(f"{name!r} has parametrized (masked) weights: call pyobc.remove_masks(model) first")


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights and pruning plan to ``path`` (loads with ``weights_only=True``).

    Example:
        >>> import torch, pyobc
        >>> net = pyobc.models.mlp(in_channels=1, input_size=4, hidden=(8,))
        >>> x = torch.randn(2, 1, 4, 4)
        >>> small, _ = pyobc.prune(net, pyobc.score(net, None, "magnitude", example_inputs=x), 0.5)
        >>> pyobc.save(small, "/tmp/small.pt")
        >>> again = pyobc.load(pyobc.models.mlp(in_channels=1, input_size=4, hidden=(8,)), "/tmp/small.pt")
        >>> torch.equal(again(x), small(x))
        True
    """
    model = unwrap_model(model)
    _check_plain(model)
    torch.save({"format": _FORMAT, "plan": plan_of(model), "state_dict": model.state_dict()}, path)


def replay(model: nn.Module, entry: dict[str, Any], example_inputs: Any = None) -> None:
    """Apply one plan entry to ``model`` in place."""
    want = {k: tuple(v) for k, v in entry["signature"].items()}
    have = model_signature(model)
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have.get(k))
        raise ValueError("the model is not the one the pruning plan was recorded on (different parameters: "
                         f"{', '.join(diff[:5])}{'...' if len(diff) > 5 else ''}); build the original "
                         "architecture with the same arguments")
    inputs = example_inputs if example_inputs is not None else entry.get("example_inputs")
    stored = [Group.from_dict(d) for d in entry["groups"]]
    groups = stored
    if inputs is not None:
        device = next(iter(model.parameters())).device
        inputs = map_tensors(lambda t: t.to(device), inputs)
        if isinstance(inputs, list):  # positional arguments (plans written before tuples were kept)
            inputs = tuple(inputs)
        try:
            rebuilt = {g.root: g for g in build_groups(model, inputs, **_structures(stored))}
        except NotImplementedError:  # layers that the original scoring ignored: use the records
            rebuilt = {}
        if rebuilt:
            groups = []
            for g in stored:
                new = rebuilt.get(g.root)
                if new is None or new.size != g.size:
                    raise ValueError(f"replaying the plan: the rebuilt model has no group rooted at {g.root!r} "
                                     f"with {g.size} channels")
                groups.append(new)
    apply_keep(model, groups, entry["keep"])


def _structures(groups: list[Group]) -> dict[str, Any]:
    """The ``build_groups`` options the recorded groups were built with: query-head groups (a ``heads``
    member with a divisor) mean ``heads="query"``, a hidden-width group ``hidden=True``."""
    kinds = [(m.kind, g.divisor) for g in groups for m in g.members]
    return {"heads": "query" if any(k == "heads" and d > 1 for k, d in kinds) else "kv",
            "hidden": any(k == "hidden_norm" for k, _ in kinds)}


def load(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, strict: bool = True) -> nn.Module:
    """Replay the plan saved in ``path`` on ``model`` (freshly built, original architecture), then load the
    weights; returns ``model`` (changed in place) with the plan attached.

    Example:
        >>> # model = pyobc.load(pyobc.models.resnet20(in_channels=1, input_size=16), "pruned.pt")
    """
    data = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a file written by pyobc.save")
    target = unwrap_model(model)
    if plan_of(target):
        raise ValueError("load needs a freshly built model, but this one was already pruned")
    for entry in data["plan"]:
        replay(target, entry, example_inputs)
    target.load_state_dict(data["state_dict"], strict=strict)
    setattr(target, PLAN_ATTR, list(data["plan"]))
    return model
