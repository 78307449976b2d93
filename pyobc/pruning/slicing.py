"""Physical channel removal driven by :class:`~pyobc.grouping.Group` records.

The group records say *which* parameter parts go with which root channel (:class:`~pyobc.grouping.Slice`);
this module adds the one thing they do not say: what else a module of each member kind carries that has to
follow the parameters (buffers such as BatchNorm's running statistics, and size attributes such as
``out_channels`` or ``embed_dim``). That is the :data:`RULES` table, the only place where member kinds meet
module types here. Everything else is generic:

1. for every removed root channel, every slice of every member gives positions to cut along one axis of
   one tensor (:func:`cuts`); the rule's buffers are cut at the member's own channel positions;
2. every cut tensor is re-gathered at its kept positions with :func:`pyobc.ops.gather_channels`, one call
   for the first cut axis of all tensors and one for the tensors cut along a second axis (a conv weight
   losing input and output channels);
3. the new tensors replace the old parameters and buffers, and each touched module's rule updates its
   attributes from the new shapes.

Indices in the records refer to the model the groups were built on: all groups of one call are cut at once,
against the unpruned shapes, so overlapping groups (a weight pruned on two axes) need no re-indexing.

Example:
    >>> import torch, torch.nn as nn
    >>> from pyobc.grouping import build_groups
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    >>> groups = build_groups(net, torch.randn(2, 4))
    >>> apply_keep(net, groups, {"0": torch.tensor([0, 2, 5])})
    >>> net[0].out_features, net[1].num_features, net[1].running_mean.shape, net[3].in_features
    (3, 3, torch.Size([3]), 3)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..attention_heads import head_family, sync_heads
from ..grouping import IN_AXIS, Group, Member, Slice, channel_buckets
from ..layers import BATCH_NORMS, CONV, INSTANCE_NORMS, LINEAR, is_norm_layer, is_transposed_linear
from ..masking import removed_mask
from ..ops import gather_channels
from .model_config import sync_config

__all__ = ["Rule", "RULES", "rule_for", "find_target", "check_member", "slice_axis", "grouped_in_axis",
           "groups_of_axis", "cuts", "shapes_after",
           "apply_keep", "apply_remove", "owner", "owner_tensor", "check_groups", "broken_model_message"]


def _weight_size(axis: int) -> Callable[[nn.Module], int]:
    """A function reading a module's weight size along ``axis`` (for the size attributes of :data:`RULES`)."""
    return lambda m: int(m.weight.shape[axis])


def _sync_attention(m: nn.MultiheadAttention, before: Mapping[str, int]) -> None:
    """``nn.MultiheadAttention`` after its embedding channels were cut.

    Sizes follow the projections. The heads split the (smaller) embedding evenly, so ``head_dim`` shrinks,
    and ``F.multi_head_attention_forward`` would scale the attention logits by ``1/sqrt(new head_dim)``:
    the query rows are multiplied by ``sqrt(new/old head_dim)`` so that the logits keep the scale the model
    was trained with. With the same number of channels cut from every head (what :func:`pyobc.prune`
    does), the pruned attention then computes exactly what the zeroed one did.
    """
    e = int(m.out_proj.weight.shape[1])
    if e % m.num_heads:
        raise ValueError(f"attention with {m.num_heads} heads cannot have {e} channels")
    m.embed_dim = e
    m.head_dim = e // m.num_heads
    if m._qkv_same_embed_dim:
        m.kdim = m.vdim = int(m.in_proj_weight.shape[1])
    else:
        m.kdim, m.vdim = int(m.k_proj_weight.shape[1]), int(m.v_proj_weight.shape[1])
    m.out_proj.in_features = e
    m.out_proj.out_features = int(m.out_proj.weight.shape[0])
    old = before.get("head_dim", m.head_dim)
    if m.head_dim != old:
        scale = math.sqrt(m.head_dim / old)
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                m.in_proj_weight[:e].mul_(scale)
            else:
                m.q_proj_weight.mul_(scale)
            if m.in_proj_bias is not None:
                m.in_proj_bias[:e].mul_(scale)


def _width(m: object) -> int:
    weight = getattr(m, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() else 0


def _rescale_norm(m: nn.Module, before: Mapping[str, int]) -> None:
    """An RMSNorm over a hidden width that lost channels: its mean square now divides by fewer channels,
    so its weight (and bias) is multiplied by ``sqrt(old / new)``; with ``eps = 0`` the cut model computes
    what the unpruned one computes with those channels zeroed (see :mod:`pyobc.hidden_width`)."""
    old, new = before.get("width", 0), _width(m)
    if old and new != old:
        with torch.no_grad():
            for p in m.parameters(recurse=False):
                p.mul_(math.sqrt(old / new))
    if isinstance(getattr(m, "normalized_shape", None), tuple) and len(m.normalized_shape) == 1:
        m.normalized_shape = (new,)  # nn.RMSNorm
    if isinstance(getattr(m, "hidden_size", None), int):
        m.hidden_size = new


def _check_conv_out(m: nn.Module) -> str | None:
    if getattr(m, "transposed", False):
        return "transposed convolutions are not supported"
    return None


def _check_depthwise(m: nn.Module) -> str | None:
    if getattr(m, "transposed", False):
        return "transposed convolutions are not supported"
    return None


def _check_conv_in(m: nn.Module) -> str | None:
    if getattr(m, "transposed", False):
        return "transposed convolutions are not supported"
    return None


def _sync_conv_out(m: nn.Module, before: Mapping[str, int]) -> None:
    m.out_channels = int(m.weight.shape[0])
    if m.out_channels % m.groups:
        raise ValueError(f"a convolution with {m.groups} groups cannot have {m.out_channels} output channels")


def _check_layernorm(m: nn.LayerNorm) -> str | None:
    if len(m.normalized_shape) != 1:
        return f"LayerNorm over {len(m.normalized_shape)} dims is not supported (only the last dim)"
    return None


@dataclasses.dataclass(frozen=True)
class Rule:
    """What follows a member's parameter slices for one (kind, module type).

    ``buffers`` are cut at the member's channel positions along axis 0 (when present); ``sync`` sets the
    module's size attributes from its new parameter shapes (``sync(module, attributes_before)``);
    ``check`` returns why a module cannot be cut (or None).
    """

    kind: str
    types: tuple[type, ...]
    buffers: tuple[str, ...] = ()
    sync: Callable[[nn.Module, Mapping[str, int]], None] = lambda m, before: None
    check: Callable[[nn.Module], str | None] = lambda m: None
    #: matches modules by a predicate instead of ``types`` (layer types pyobc recognises by name/attributes)
    match: Callable[[object], bool] | None = None

    def applies(self, member: Member, target: object) -> bool:
        """Whether this rule is the one for ``member`` (its module or parameter ``target``)."""
        if self.kind != member.kind:
            return False
        return self.match(target) if self.match is not None else isinstance(target, self.types)


def _set(**attrs: Callable[[nn.Module], object]) -> Callable[[nn.Module, Mapping[str, int]], None]:
    def sync(m: nn.Module, before: Mapping[str, int]) -> None:
        for name, fn in attrs.items():
            setattr(m, name, fn(m))
    return sync


def _sync_groupnorm(m: nn.GroupNorm, before: Mapping[str, int]) -> None:
    c = int(m.weight.shape[0])
    if c % m.num_groups:
        raise ValueError(f"GroupNorm with {m.num_groups} groups cannot keep {c} channels")
    m.num_channels = c


#: The single table of module updates per member kind (first matching type wins).
RULES: tuple[Rule, ...] = (
    Rule("out", (), sync=_set(nf=_weight_size(1)), match=is_transposed_linear),  # HF Conv1D: weight (in, out)
    Rule("in", (), sync=_set(nx=_weight_size(0)), match=is_transposed_linear),
    Rule("out", CONV, sync=_sync_conv_out, check=_check_conv_out),
    Rule("out", LINEAR, sync=_set(out_features=_weight_size(0))),
    Rule("in", CONV, sync=_set(in_channels=lambda m: int(m.weight.shape[1]) * m.groups), check=_check_conv_in),
    Rule("in", LINEAR, sync=_set(in_features=_weight_size(1))),
    Rule("depthwise", CONV, sync=_set(out_channels=_weight_size(0), in_channels=_weight_size(0),
                                      groups=_weight_size(0)),
         check=_check_depthwise),
    Rule("norm", BATCH_NORMS, buffers=("running_mean", "running_var"), sync=_set(num_features=_weight_size(0))),
    Rule("norm", INSTANCE_NORMS, buffers=("running_mean", "running_var"), sync=_set(num_features=_weight_size(0))),
    Rule("norm", (nn.LayerNorm,), sync=_set(normalized_shape=lambda m: (int(m.weight.shape[0]),)),
         check=_check_layernorm),
    Rule("norm", (nn.GroupNorm,), sync=_sync_groupnorm),
    Rule("prelu", (nn.PReLU,), sync=_set(num_parameters=_weight_size(0))),
    Rule("embedding", (nn.Embedding,), sync=_set(embedding_dim=_weight_size(1))),
    Rule("attention", (nn.MultiheadAttention,), sync=_sync_attention),
    Rule("heads", (), sync=lambda m, before: sync_heads(m),
         match=lambda m: isinstance(m, nn.Module) and head_family(m) is not None),
    Rule("hidden_norm", (), sync=_rescale_norm, match=lambda m: isinstance(m, nn.Module) and is_norm_layer(m)),
    Rule("param", (nn.Parameter,)),
)


def owner(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    """The module that holds tensor ``qualified`` (a parameter or buffer name) and its attribute name."""
    path, _, attr = qualified.rpartition(".")
    try:
        return model.get_submodule(path), attr
    except AttributeError:
        raise KeyError(f"the model has no module {path!r} (for {qualified!r})") from None


def find_target(model: nn.Module, member: Member) -> object:
    """The member's module (or bare parameter) in ``model``; KeyError when it has none."""
    if member.kind == "param":
        mod, attr = owner(model, member.module)
        t = getattr(mod, attr, None)
        if not isinstance(t, nn.Parameter):
            raise KeyError(f"the model has no parameter {member.module!r}")
        return t
    try:
        return model.get_submodule(member.module)
    except AttributeError:
        raise KeyError(f"the model has no module {member.module!r}") from None


def rule_for(member: Member, target: object) -> Rule:
    """The :data:`RULES` entry for a member (NotImplementedError naming the layer when there is none)."""
    for rule in RULES:
        if rule.applies(member, target):
            return rule
    raise NotImplementedError(
        f"pyobc cannot cut {member.kind!r} channels of {member.module!r} ({type(target).__name__}); "
        "pass it (or the layer whose group contains it) in ignored_layers")


def check_member(model: nn.Module, member: Member) -> tuple[object, Rule]:
    """The member's module (or parameter) and rule; errors name the layer that cannot be cut."""
    target = find_target(model, member)
    rule = rule_for(member, target)
    why = rule.check(target) if isinstance(target, nn.Module) else None
    if why:
        raise NotImplementedError(f"cannot prune {member.module!r}: {why}; pass it in ignored_layers")
    return target, rule


def check_groups(model: nn.Module, groups: Sequence[Group], cutting: Iterable[str]
                 ) -> dict[tuple[str, str, str], tuple[object, Rule]]:
    """:func:`check_member` for every member of ``groups``: ``(root, module, kind) -> (target, rule)``.

    When a group that loses channels (its root in ``cutting``) has a member that cannot be cut, one
    NotImplementedError names every such layer in ``groups`` at once and the complete ``ignored_layers``
    list that leaves all their groups whole (a grouped convolution is both a group's root and a consumer
    in its feeder's group: ignoring the layer alone is not enough).
    """
    out: dict[tuple[str, str, str], tuple[object, Rule]] = {}
    failed: dict[str, str] = {}
    roots: set[str] = set()
    for g in groups:
        for m in g.members:
            try:
                out[(g.root, m.module, m.kind)] = check_member(model, m)
            except NotImplementedError as e:
                failed.setdefault(m.module, str(e).split("; pass")[0])
                roots.add(g.root)
    if failed and roots & set(cutting):
        raise NotImplementedError(
            f"pyobc cannot cut {len(failed)} layer(s): "
            + "; ".join(why for _, why in sorted(failed.items()))
            + f". Leave their groups whole with ignored_layers={sorted(roots)!r}")
    return out


def grouped_in_axis(groups: int) -> int:
    """The cut-axis code of the group-expanded input channels of a weight with ``groups`` > 1 groups
    (``-1 - groups``: below every real axis and :data:`IN_AXIS`); :func:`groups_of_axis` decodes it.

    Example:
        >>> grouped_in_axis(4), groups_of_axis(grouped_in_axis(4)), groups_of_axis(1)
        (-5, 4, 1)
    """
    return -1 - groups


def groups_of_axis(axis: int) -> int:
    """The group count a cut axis stands for (1 for a real tensor axis); see :func:`grouped_in_axis`."""
    return -1 - axis if axis <= -3 else 1


def slice_axis(kind: str, s: Slice, ndim: int) -> int:
    """The tensor axis a slice of a ``kind`` member cuts: :data:`IN_AXIS` of an ``in`` member is axis 1 of
    an ungrouped conv/linear weight, and :func:`grouped_in_axis` of a grouped one (group ``g``'s input
    channel ``g * I_g + j`` is column ``j`` of its own block of rows)."""
    if kind == "in" and s.axis == IN_AXIS:
        return 1 if s.groups == 1 else grouped_in_axis(s.groups)
    return s.axis % ndim


def _cut_grouped_in(t: torch.Tensor, groups: int, positions: torch.Tensor, name: str) -> torch.Tensor:
    """A grouped weight ``(O, I_g, ...)`` without the group-expanded input channels ``positions``; every
    group must lose as many as the others (ValueError otherwise)."""
    o, ig = int(t.shape[0]), int(t.shape[1])
    per_group = torch.bincount(positions.cpu() // ig, minlength=groups)
    if bool((per_group != per_group[0]).any()):
        raise ValueError(f"{name}: the groups of a grouped convolution must lose equal numbers of input channels, "
                         f"got {per_group.tolist()}")
    expanded = t.reshape(groups, o // groups, ig, *t.shape[2:]).transpose(0, 1).reshape(o // groups, groups * ig,
                                                                                         *t.shape[2:])
    keep = _keep_index(groups * ig, positions, t.device, name, 1)
    kept = expanded.index_select(1, keep)
    new_ig = kept.shape[1] // groups
    return kept.reshape(o // groups, groups, new_ig, *t.shape[2:]).transpose(0, 1).reshape(o, new_ig,
                                                                                          *t.shape[2:]).contiguous()


def _check_even(group: Group, mask: torch.Tensor) -> None:
    """Groups whose channels fall into heads (or convolution groups) must lose as many from each: a lopsided
    cut would leave widths that look consistent but mix heads up."""
    buckets = channel_buckets(group)
    if buckets is None:
        return
    counts = torch.bincount(buckets[mask.cpu()], minlength=group.divisor)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"group {group.root!r} must lose the same number of channels from each of its "
                         f"{group.divisor} heads / groups, got {counts.tolist()}")


def cuts(model: nn.Module, groups: Iterable[Group], remove: Mapping[str, torch.Tensor],
         shapes: Mapping[str, tuple[int, ...]] | None = None,
         ) -> tuple[dict[tuple[str, int], torch.Tensor], list[tuple[nn.Module, Rule]]]:
    """Positions to cut per (tensor name, axis), and the (module, rule) pairs whose attributes follow.

    ``remove`` maps a group root to the root channels removed (groups absent from it are untouched).
    With ``shapes`` (tensor name -> shape), no model tensor is read: used to predict shapes.
    """
    acc: dict[tuple[str, int], list[torch.Tensor]] = {}
    touched: dict[tuple[int, str], tuple[nn.Module, Rule]] = {}
    by_root = {g.root: g for g in groups}
    for root in remove:
        if root not in by_root:
            raise KeyError(f"no group is rooted at {root!r}")
    checked = check_groups(model, [by_root[r] for r in remove], [r for r, c in remove.items() if len(c)])
    for root, channels in remove.items():
        group = by_root[root]
        mask = removed_mask(group, channels)
        if not bool(mask.any()):
            continue
        _check_even(group, mask)
        for member in group.members:
            target, rule = checked[(root, member.module, member.kind)]
            if isinstance(target, nn.Module):
                touched.setdefault((id(target), rule.kind), (target, rule))
            for s in member.slices:
                shape = shapes[s.param] if shapes is not None else tuple(owner_tensor(model, s.param).shape)
                axis = slice_axis(member.kind, s, len(shape))
                acc.setdefault((s.param, axis), []).append(s.index[mask[s.root]])
            for buf in rule.buffers:
                if isinstance(target, nn.Module) and getattr(target, buf, None) is not None:
                    name = f"{member.module}.{buf}" if member.module else buf
                    acc.setdefault((name, 0), []).append(member.index[mask[member.root]])
    out = {key: torch.unique(torch.cat(parts)) for key, parts in acc.items()}
    return {k: v for k, v in out.items() if v.numel()}, list(touched.values())


def owner_tensor(model: nn.Module, qualified: str) -> torch.Tensor:
    """The parameter or buffer named ``qualified`` (KeyError when the model has no such tensor)."""
    mod, attr = owner(model, qualified)
    t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        raise KeyError(f"the model has no tensor {qualified!r}")
    return t


def shapes_after(shapes: Mapping[str, tuple[int, ...]], cut: Mapping[tuple[str, int], torch.Tensor]
                 ) -> dict[str, tuple[int, ...]]:
    """Tensor shapes once ``cut`` positions are removed."""
    out = {k: list(v) for k, v in shapes.items()}
    for (name, axis), positions in cut.items():
        if name in out:
            groups = groups_of_axis(axis)
            out[name][1 if groups > 1 else axis] -= int(positions.numel()) // groups
    return {k: tuple(v) for k, v in out.items()}


def _keep_index(size: int, positions: torch.Tensor, device: torch.device, name: str, axis: int) -> torch.Tensor:
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= size):
        raise IndexError(f"{name}: axis {axis} has {size} entries but the groups cut position "
                         f"{int(positions.max())}; the groups were built on a different model")
    keep = torch.ones(size, dtype=torch.bool)
    keep[positions] = False
    if not bool(keep.any()):
        raise ValueError(f"{name}: every entry of axis {axis} would be removed")
    return keep.nonzero().reshape(-1).to(device)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> every name the parameter has in ``model`` (several when tied)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def apply_keep(model: nn.Module, groups: Sequence[Group], keep: Mapping[str, torch.Tensor | Sequence[int]]) -> None:
    """Cut ``model`` in place so that group ``root`` keeps only the root channels ``keep[root]``.

    Example:
        >>> # apply_keep(model, scores.groups, {"layer1.0.conv1": torch.tensor([0, 3, 7])})
    """
    by_root = {g.root: g for g in groups}
    remove = {}
    for root, kept in keep.items():
        if root not in by_root:
            raise KeyError(f"no group is rooted at {root!r}")
        mask = ~removed_mask(by_root[root], kept)
        remove[root] = mask.nonzero().reshape(-1)
    apply_remove(model, groups, remove)


def _gather_all(per_tensor: Mapping[str, list[tuple[int, torch.Tensor]]], current: dict[str, torch.Tensor]) -> None:
    """Cut ``current`` tensors at the (axis, positions) lists of ``per_tensor``: one batched
    :func:`pyobc.ops.gather_channels` call for every tensor's first axis, one for the second..."""
    passes = max((len(v) for v in per_tensor.values()), default=0)
    with torch.no_grad():
        for k in range(passes):
            names = [n for n, axes in per_tensor.items() if len(axes) > k]
            tensors, dims, indices = [], [], []
            for n in names:
                axis, positions = per_tensor[n][k]
                t = current[n]
                tensors.append(t)
                dims.append(axis)
                indices.append(_keep_index(t.shape[axis], positions, t.device, n, axis))
            for n, t in zip(names, gather_channels(tensors, dims, indices)):
                current[n] = t


def apply_remove(model: nn.Module, groups: Sequence[Group], remove: Mapping[str, torch.Tensor]) -> None:
    """Cut ``model`` in place: group ``root`` loses the root channels ``remove[root]``."""
    cut, touched = cuts(model, groups, remove)
    if not cut:
        return
    before = {id(m): {"head_dim": getattr(m, "head_dim", 0), "width": _width(m)} for m, _ in touched}
    per_tensor: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (name, axis), positions in sorted(cut.items()):
        per_tensor.setdefault(name, []).append((axis, positions))
    current = {name: owner_tensor(model, name).detach() for name in per_tensor}
    with torch.no_grad():  # grouped input channels first (sorted first), against the uncut rows
        for name, axes in per_tensor.items():
            if groups_of_axis(axes[0][0]) > 1:
                current[name] = _cut_grouped_in(current[name], groups_of_axis(axes[0][0]), axes[0][1], name)
                axes.pop(0)
    _gather_all({n: axes for n, axes in per_tensor.items() if axes}, current)
    aliases = _aliases(model)
    for name, t in current.items():
        mod, attr = owner(model, name)
        old = getattr(mod, attr)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(t, requires_grad=old.requires_grad)
            for alias in aliases.get(id(old), [name]):  # tied parameters stay one tensor
                setattr(*owner(model, alias), new)
        else:
            mod._buffers[attr] = t
    for m, rule in touched:
        rule.sync(m, before[id(m)])
    sync_config(model)


def broken_model_message(error: Exception, groups: Sequence[Group], remove: Mapping[str, torch.Tensor]) -> str:
    """The message for a pruned model that no longer runs: the error, and the groups cut in this step that
    touch the failing module (``error`` from :func:`pyobc.pruning.counting.run_naming_failure`, which
    names it as ``inside 'name'``), to pass in ``ignored_layers``.

    Example:
        >>> broken_model_message(RuntimeError("Net fails inside 'a.b' (Linear): ..."), [], {})
        "the pruned model does not run on example_inputs: Net fails inside 'a.b' (Linear): .... ..."
    """
    text = str(error)
    where = text.split("inside '", 1)[1].split("'", 1)[0] if "inside '" in text else None
    cut = [g for g in groups if len(remove.get(g.root, ()))]

    def near(module: str) -> bool:
        return where is not None and (module == where or module.startswith(where + ".")
                                      or where.startswith(module + ".") or not where)
    involved = sorted({g.root for g in cut if any(near(m.module) for m in g.members)}) or sorted(g.root for g in cut)
    return (f"the pruned model does not run on example_inputs: {text}. pyobc cut groups whose layout this "
            f"module depends on in a way pyobc cannot see (e.g. widths kept as ints); leave them whole with "
            f"ignored_layers={involved[:20]!r}" + (" ..." if len(involved) > 20 else ""))
