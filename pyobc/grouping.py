"""Groups of coupled channels, found with Torch-Pruning's DependencyGraph.

A *group* is everything that must be removed together when one channel of its *root* layer (a conv or
linear layer's out-channel) is removed: the root's weight rows and bias, the norm channels after it, the
in-channels of every consumer, residual partners, attention projections... pyobc does not trace models
itself; it converts Torch-Pruning's groups into plain, picklable records that name parameters, so that
every criterion reduces to the same operation: per-channel sums of a parameter-shaped tensor along one
axis, gathered into the group's root channels.

Example:
    >>> import torch, torch.nn as nn
    >>> from pyobc.grouping import build_groups
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> groups = build_groups(net, torch.randn(2, 4))
    >>> [(g.root, g.size, [m.kind for m in g.members]) for g in groups]
    [('0', 8, ['out', 'in'])]
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .model_state import preserved_state, unwrap_model

__all__ = ["IN_AXIS", "Slice", "Member", "Group", "build_groups"]

#: Axis tag for "input channels" of a conv/linear weight: axis 1, expanded by the layer's ``groups``
#: (for a grouped conv, input channel ``g*I_g + j`` lives at ``weight[g*O_g:(g+1)*O_g, j]``).
IN_AXIS = -1


@dataclasses.dataclass(frozen=True)
class Slice:
    """Part of one parameter that belongs to a group: ``param`` indexed by ``index`` along ``axis``.

    ``root[j]`` is the root channel that position ``index[j]`` belongs to (several positions may share a
    root channel, e.g. the in-features of a linear layer after a flatten). ``axis`` is a tensor axis, or
    :data:`IN_AXIS` for the (group-expanded) input channels of a conv/linear weight, with ``groups`` the
    layer's group count.
    """

    param: str
    axis: int
    index: torch.Tensor
    root: torch.Tensor
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Member:
    """One coupled layer (or bare parameter) in a group.

    ``kind`` is one of ``out`` (conv/linear out-channels: weight rows and bias), ``in`` (conv/linear
    in-channels), ``depthwise`` (depthwise conv channels), ``norm`` (affine norm channels),
    ``attention`` (``nn.MultiheadAttention`` embedding channels), ``embedding``, ``prelu``, ``param``
    (a bare ``nn.Parameter``). ``index``/``root`` are the member's channel positions and the root
    channels they map to; ``slices`` list the parameter parts that are removed with them.
    """

    module: str
    kind: str
    module_type: str
    index: torch.Tensor
    root: torch.Tensor
    slices: tuple[Slice, ...]

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.param for s in self.slices))


@dataclasses.dataclass(frozen=True)
class Group:
    """A set of coupled members pruned together; ``size`` channels, indexed by the root's out-channels.

    ``divisor`` > 1 means the channel count must stay a multiple of it (attention heads).
    """

    root: str
    size: int
    members: tuple[Member, ...]
    divisor: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "size": self.size,
            "divisor": self.divisor,
            "members": [
                {
                    "module": m.module,
                    "kind": m.kind,
                    "module_type": m.module_type,
                    "index": m.index,
                    "root": m.root,
                    "slices": [dataclasses.asdict(s) for s in m.slices],
                }
                for m in self.members
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        members = tuple(
            Member(
                module=m["module"],
                kind=m["kind"],
                module_type=m["module_type"],
                index=m["index"],
                root=m["root"],
                slices=tuple(Slice(**s) for s in m["slices"]),
            )
            for m in d["members"]
        )
        return cls(root=d["root"], size=int(d["size"]), members=members, divisor=int(d.get("divisor", 1)))


# ---------------------------------------------------------------------------------------------------
# conversion of Torch-Pruning groups


def _long(values: Iterable[int]) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.long)


def _slices_for(kind: str, module: nn.Module, name: str, index: torch.Tensor, root: torch.Tensor,
                pruning_dim: int | None = None) -> list[Slice]:
    """The parameter parts that go with ``index`` channels of ``module`` for a member of ``kind``.

    This table is the single place where layer types meet parameter layouts.
    """
    p = (lambda attr: f"{name}.{attr}" if name else attr)
    out: list[Slice] = []

    def add(attr: str, axis: int, idx: torch.Tensor = index, groups: int = 1) -> None:
        if getattr(module, attr, None) is not None:
            out.append(Slice(p(attr), axis, idx, root, groups))

    if kind == "out" or kind == "depthwise":
        add("weight", 0)
        add("bias", 0)
    elif kind == "in":
        add("weight", IN_AXIS, groups=getattr(module, "groups", 1))
    elif kind == "norm":
        add("weight", 0)
        add("bias", 0)
    elif kind == "prelu":
        if module.weight.numel() > 1:
            add("weight", 0)
    elif kind == "embedding":
        add("weight", 1)
    elif kind == "attention":
        e = module.embed_dim
        if module.in_proj_weight is not None:
            for k in range(3):  # rows of q, k and v
                add("in_proj_weight", 0, index + k * e)
            add("in_proj_weight", 1)
        for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            add(attr, 0)
        if module.in_proj_bias is not None:
            for k in range(3):
                add("in_proj_bias", 0, index + k * e)
        add("bias_k", 2)
        add("bias_v", 2)
        sub = f"{name}.out_proj" if name else "out_proj"
        out.append(Slice(f"{sub}.weight", 0, index, root))
        out.append(Slice(f"{sub}.weight", 1, index, root))
        if module.out_proj.bias is not None:
            out.append(Slice(f"{sub}.bias", 0, index, root))
    elif kind == "param":
        out.append(Slice(name, int(pruning_dim), index, root))
    else:  # pragma: no cover - guarded by _member_kind
        raise AssertionError(kind)
    return out


def _member_kind(tp_function: Any, pruner: Any, is_out: bool) -> str | None:
    """Map a Torch-Pruning pruner to a member kind; None for parameter-free nodes (adds, reshapes...)."""
    f = tp_function
    table = [
        (f.DepthwiseConvPruner, "depthwise"),
        (f.ConvPruner, "out" if is_out else "in"),
        (f.LinearPruner, "out" if is_out else "in"),
        (f.BatchnormPruner, "norm"),
        (f.LayernormPruner, "norm"),
        (f.GroupNormPruner, "norm"),
        (f.InstanceNormPruner, "norm"),
        (f.PReLUPruner, "prelu"),
        (f.EmbeddingPruner, "embedding"),
        (f.MultiheadAttentionPruner, "attention"),
        (f.ParameterPruner, "param"),
    ]
    for cls, kind in table:
        if isinstance(pruner, cls):
            return kind
    if isinstance(pruner, f.BasePruningFunc):
        return "unsupported"
    return None


def _feeds_output(tp: Any, node: Any) -> bool:
    """True if ``node``'s output reaches the model output through parameter-free ops only.

    A node without consumers is an output (Torch-Pruning adds no output node when the model returns a
    layer's output directly)."""
    dummy = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp,
             tp.ops._SliceOp, tp.ops._UnbindOp, tp.ops._ExpandOp)
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, tp.ops._OutputOp) or not n.outputs:
            return True
        stack.extend(o for o in n.outputs if isinstance(o.module, dummy))
    return False


def build_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_layers: Sequence[nn.Module | str] = (),
    forward_fn: Any = None,
    called: set[str] | None = None,
) -> list[Group]:
    """Find the prunable groups of ``model`` with Torch-Pruning's DependencyGraph.

    Layers whose out-channels are model outputs (classifier heads) are not prunable and get no group.
    ``ignored_layers`` (modules or qualified names) removes every group that would prune them.
    The model's train/eval flags, parameters and ``.grad`` are left as they were. If ``called`` is a
    set, the names of the modules the tracing forward pass called are added to it (a module can own
    parameters that another module reads directly, like ``nn.MultiheadAttention.out_proj``).

    Raises:
        ValueError: the model has no prunable layer.
        NotImplementedError: a group contains a layer type pyobc cannot score (named in the message).
    """
    import torch_pruning as tp  # imported on first use: it takes a second to import

    model = unwrap_model(model)
    ignored = _ignored_ids(model, ignored_layers)
    dg, seen = _trace(tp, model, example_inputs, forward_fn)
    if called is not None:
        called |= seen
    converter = _GroupConverter(tp, dg, model, ignored)
    groups = [g for tp_group in dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear))
              if (g := converter.convert(tp_group)) is not None]
    if converter.unsupported:
        raise NotImplementedError(
            "pyobc cannot score these layers, which are coupled to prunable channels: "
            + ", ".join(sorted(converter.unsupported))
            + ". Pass them in ignored_layers to leave their groups unscored.")
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer: pyobc prunes the out-channels of conv and "
            "linear layers that do not produce the model's output")
    return groups


def _ignored_ids(model: nn.Module, ignored_layers: Sequence[nn.Module | str]) -> set[int]:
    """``id()`` of every module in ``ignored_layers`` (modules or qualified names)."""
    ignored: set[int] = set()
    for layer in ignored_layers:
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"ignored_layers: model has no submodule named {layer!r}") from None
        if not isinstance(layer, nn.Module):
            raise TypeError(f"ignored_layers entries must be modules or names, got {type(layer).__name__}")
        ignored.add(id(layer))
    return ignored


def _trace(tp: Any, model: nn.Module, example_inputs: Any, forward_fn: Any) -> tuple[Any, set[str]]:
    """Torch-Pruning's DependencyGraph of ``model``, and the names of the modules the forward called."""
    seen: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.add(n)) for n, m in model.named_modules()]
    try:
        with preserved_state(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about every unwrapped parameter
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, forward_fn=forward_fn, verbose=False)
    finally:
        for h in handles:
            h.remove()
    return dg, seen


class _GroupConverter:
    """Turns Torch-Pruning groups of one model into :class:`Group` records; collects the names of
    coupled layers pyobc cannot score in :attr:`unsupported`."""

    def __init__(self, tp: Any, dg: Any, model: nn.Module, ignored: set[int]):
        from torch_pruning.pruner import function as tp_function

        self.tp, self.tp_function, self.dg, self.ignored = tp, tp_function, dg, ignored
        self.names = {id(m): n for n, m in model.named_modules()}
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.unsupported: set[str] = set()

    def convert(self, tp_group: Any) -> Group | None:
        """The group, or None when it must not be pruned (an ignored layer, a model output) or is empty."""
        members: list[Member] = []
        divisor = 1
        for item in tp_group:
            member = self._member(item)
            if member is _SKIP_GROUP:
                return None
            if member is None:
                continue
            if member.kind == "attention":
                divisor = max(divisor, int(item.dep.target.module.num_heads))
            members.append(member)
        if not members:
            return None
        root_member = members[0]
        size = int(root_member.root.max().item()) + 1 if root_member.root.numel() else 0
        return Group(root=root_member.module, size=size, members=tuple(members), divisor=divisor)

    def _member(self, item: Any) -> Member | object | None:
        """One Torch-Pruning dependency as a :class:`Member`; None to leave it out; :data:`_SKIP_GROUP`
        when the whole group must not be pruned."""
        dep = item.dep
        target = dep.target.module
        is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
        kind = _member_kind(self.tp_function, dep.handler.__self__, is_out)
        if kind is None:
            return None
        if isinstance(target, nn.Parameter):
            name, module_type = self.param_names.get(id(target)), "Parameter"
        else:
            name, module_type = self.names.get(id(target)), type(target).__name__
            if id(target) in self.ignored and is_out:
                return _SKIP_GROUP
        if name is None:
            return None
        if kind == "unsupported":
            self.unsupported.add(f"{name} ({module_type})")
            return None
        if kind in ("out", "depthwise", "attention", "norm") and _feeds_output(self.tp, dep.target):
            return _SKIP_GROUP  # removing these channels would change the model's output shape
        index, root = _long(item.idxs), _long(item.root_idxs)
        slices = _slices_for(kind, target, name, index, root, pruning_dim=dep.target.pruning_dim)
        return Member(name, kind, module_type, index, root, tuple(slices)) if slices else None


#: returned by :meth:`_GroupConverter._member` for a dependency that makes its whole group unprunable
_SKIP_GROUP = object()
