"""After a cut: the pruned model must compute what the unpruned model computes with the same channels zeroed.

Zeroing every parameter slice of a removed channel has exactly the effect of removing it (see
:mod:`pyobc.masking`), so on the example inputs the two outputs agree up to rounding — *if* the groups map
each channel to the right slices of every coupled layer. Torch-Pruning's DependencyGraph maps a reshape
that keeps the channel count as the identity, so a channel shuffle (``view`` → ``transpose`` →
``reshape``) between a layer and its consumers yields groups that pair the wrong input channels: the
pruned model runs, and computes something else. This check (outputs taken before the cut, compared after
it) catches that, and any other mismatch between the groups and the model's data flow, at the cost of one
forward of each model; when it fails, :func:`mismatched_groups` names the groups to leave whole.

It applies where zeroing a channel is removing it: not where a module normalises across channels
(LayerNorm, GroupNorm, RMSNorm: the mean over channels changes with their number), so models with such a
module are not checked. A softmax or norm over channels written as a function would make it warn
although the cut is right; the warning says so.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from ..grouping import Group
from ..masking import keep_masks
from ..model_state import preserved_state
from ..nested import tensors_in
from .counting import run_naming_failure

__all__ = ["normalises_across_channels", "zeroed_outputs", "check_zeroing_equivalence", "mismatched_groups"]

#: seconds the search for the groups behind a failed check may take (it cuts one copy per group)
SEARCH_SECONDS = 30.0

_CROSS_CHANNEL = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def normalises_across_channels(module: nn.Module) -> bool:
    """Whether ``module`` normalises over the channel axis (torch's LayerNorm, GroupNorm, RMSNorm,
    LocalResponseNorm, or a class named like one, as Hugging Face's ``LlamaRMSNorm``)."""
    name = type(module).__name__
    return isinstance(module, _CROSS_CHANNEL) or name.endswith(("LayerNorm", "GroupNorm", "RMSNorm", "LayerNorm2d"))


class _Call(nn.Module):
    """``run_naming_failure(model, inputs)`` as a module, so ``functional_call`` can swap the parameters
    while the model is called the one way pyobc calls it (a dict is keywords, a tuple positional)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Any:
        return run_naming_failure(self.model, inputs)


def _outputs(model: nn.Module, inputs: Any, params: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    with preserved_state(model), torch.no_grad():
        swapped = {f"model.{k}": v for k, v in (params or {}).items()}
        out = functional_call(_Call(model), swapped, (inputs,))
    return [t.detach() for t in tensors_in(out) if t.is_floating_point()]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def zeroed_outputs(model: nn.Module, groups: Sequence[Group], remove: Mapping[str, torch.Tensor],
                   example_inputs: Any) -> list[torch.Tensor] | None:
    """The outputs of ``model`` on ``example_inputs`` with the ``remove`` channels' parameter slices zeroed
    (the model itself is not changed), taken before the cut; None where the check does not apply (nothing
    removed, a module that normalises across channels)."""
    if not any(torch.as_tensor(v).numel() for v in remove.values()):
        return None
    if any(normalises_across_channels(m) for m in model.modules()):
        return None
    params = dict(model.named_parameters())
    masked = dict(params)
    for name, keep in keep_masks(groups, params, remove).items():
        masked[name] = params[name].detach() * keep.to(params[name].device, params[name].dtype)
    return _outputs(model, example_inputs, masked)


def mismatched_groups(model: nn.Module, groups: Sequence[Group], remove: Mapping[str, torch.Tensor],
                      example_inputs: Any, seconds: float = SEARCH_SECONDS) -> tuple[list[str], bool]:
    """The roots of the groups whose cut alone computes something else than zeroing the same channels (each
    group cut on its own copy of the unpruned ``model``), and whether every group was tried within
    ``seconds`` (the search runs only after the whole cut has failed the check)."""
    from .slicing import apply_remove  # slicing imports this module's neighbours; import on the failure path

    found: list[str] = []
    start = time.perf_counter()
    candidates = [g for g in groups if torch.as_tensor(remove.get(g.root, ())).numel()]
    for i, group in enumerate(candidates):
        if time.perf_counter() - start > seconds:
            return found, False
        one = {group.root: remove[group.root]}
        want = zeroed_outputs(model, groups, one, example_inputs)
        single = copy.deepcopy(model)
        try:
            apply_remove(single, groups, one)
            worst = _difference(want, _outputs(single, example_inputs))
        except Exception:  # noqa: BLE001 - a group whose cut alone breaks the model is one of them
            worst = float("inf")
        if worst is not None and worst > _tolerance(want[0].dtype):
            found.append(group.root)
    return found, True


def _difference(want: list[torch.Tensor] | None, got: list[torch.Tensor]) -> float | None:
    """Largest difference relative to each output's scale; None when the outputs are not comparable."""
    if want is None or len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return None  # e.g. outputs shaped by the channel count (features): nothing to compare
    worst = 0.0
    for a, b in zip(want, got):
        if a.numel():
            worst = max(worst, float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12))
    return worst


def check_zeroing_equivalence(want: list[torch.Tensor] | None, pruned: nn.Module, example_inputs: Any,
                              culprits: Callable[[], tuple[list[str], bool]] | None = None) -> float | None:
    """Compare ``pruned(example_inputs)`` with :func:`zeroed_outputs` taken before the cut; warn when they
    differ by more than rounding. Returns the largest difference relative to the output's scale, or None
    where there is nothing to compare.

    Example:
        >>> import copy, torch, torch.nn as nn
        >>> from pyobc.grouping import build_groups
        >>> from pyobc.pruning.slicing import apply_remove
        >>> net, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4)
        >>> groups, remove = build_groups(net, x), {"0": torch.tensor([1, 5])}
        >>> want = zeroed_outputs(net, groups, remove, x)
        >>> apply_remove(net, groups, remove)
        >>> check_zeroing_equivalence(want, net, x) < 1e-5
        True
    """
    if want is None:
        return None
    worst = _difference(want, _outputs(pruned, example_inputs))
    if worst is None or worst <= _tolerance(want[0].dtype if want else torch.float32):
        return worst
    if culprits is None:
        way_out = "pass the layers around such an op in ignored_layers"
    else:
        roots, complete = culprits()
        way_out = (f"pass ignored_layers={roots!r} to leave {'those groups' if len(roots) > 1 else 'that group'} "
                   "whole" + ("" if complete else f" (the search stopped after {SEARCH_SECONDS:.0f} s; there may "
                              "be more)") if roots else "no single group's cut differs on its own")
    warnings.warn(
        f"pyobc.prune: the pruned model's outputs differ from the unpruned model's with the same channels "
        f"zeroed (largest difference {worst:.3g} of the output's scale). The channel groups do not match "
        "the model's data flow: Torch-Pruning maps a reshape that keeps the channel count (a channel "
        f"shuffle, view -> transpose -> reshape) as if channels stayed in place. Check the pruned model; {way_out}. "
        "(A softmax or norm over channels written as a function gives this warning for a correct cut.)",
        stacklevel=4)
    return worst
