"""Index maps from parameter-axis sums to member channels to group channels.

Every criterion pyobc implements ends in the same reduction: take two parameter-shaped tensors (the
weights and a gradient, a Hessian-vector product, a Fisher diagonal...), sum their product along one
axis of each parameter ("axis sums"), gather the entries that belong to each group member and add them
into the member's row of root channels, then combine members into group scores. :class:`Layout` builds
the index maps once per model so each batch costs a handful of kernel calls instead of a Python loop
over dependencies.

Each map is kept as a sparse (CSR) matrix: sources -> member channels and member channels -> group
channels are one :func:`pyobc.ops.csr_gather_sum` launch each, for all groups and every row of a
row-batched input at once (``group_mean_nonzero`` and ``group_amax`` are one
:func:`pyobc.ops.csr_gather_reduce` launch). Sums are deterministic (fixed order per output, no atomics)
and accumulate in float64 for float32 input. Under forward-mode AD or functorch transforms, and for
dtypes the ops do not take, the same maps run as ``index_select``/``index_add``.

Levels (all flat float vectors, optionally with a leading row dimension):
    sources  — concatenated axis sums, one block per (parameter, axis) the groups touch
    members  — one block of ``group.size`` channels per member of every group
    groups   — one block of ``group.size`` channels per group
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch.autograd import forward_ad as _forward_ad

from .. import ops
from ..grouping import IN_AXIS, Group, Member

__all__ = ["Layout", "axis_sums"]


def _norm_axis(axis: int, ndim: int, groups: int) -> tuple[int, int]:
    """Canonical (axis, groups): axis 1 of a >=2-D weight is the (group-expanded) input axis."""
    if axis == IN_AXIS:
        return IN_AXIS, groups
    if axis < 0:
        axis += ndim
    if axis == 1 and ndim >= 2:
        return IN_AXIS, groups
    return axis, 1


def _param_source(group: Group, sl, params: Mapping[str, torch.Tensor]) -> tuple[tuple, int, int]:
    """(source key, group count, length) of one parameter slice."""
    if sl.param not in params:
        raise KeyError(f"group {group.root!r} refers to unknown parameter {sl.param!r}")
    shape = params[sl.param].shape
    axis, grp = _norm_axis(sl.axis, len(shape), sl.groups)
    if len(shape) <= 1:
        length = shape.numel()
    elif axis == IN_AXIS:
        length = shape[1] * grp
    else:
        length = shape[axis]
    return ("param", sl.param, axis), grp, int(length)


def _member_sources(groups: Sequence[Group], params: Mapping[str, torch.Tensor],
                    activation: Callable[[Member], tuple[str, str, int] | None] | None):
    """The sources the members read, in first-seen order: ``{key: groups}`` (keys
    ``("param", name, axis)`` or ``("act", module, role)``), ``{key: length}``, and per member the
    list of ``(key, index, root)`` entries."""
    source_axes: dict[tuple, int] = {}
    lengths: dict[tuple, int] = {}
    plan: list[list[tuple[tuple, torch.Tensor, torch.Tensor]]] = []
    for g in groups:
        for m in g.members:
            act = activation(m) if activation is not None else None
            if act is not None:
                key = ("act", act[0], act[1])
                lengths[key] = int(act[2])
                source_axes.setdefault(key, 1)
                plan.append([(key, m.index, m.root)])
                continue
            entries = []
            for sl in m.slices:
                key, grp, lengths[key] = _param_source(g, sl, params)
                source_axes[key] = grp
                entries.append((key, sl.index, sl.root))
            plan.append(entries)
    return source_axes, lengths, plan


def axis_sums(a: torch.Tensor, b: torch.Tensor, axes: Sequence[int], groups: int = 1) -> dict[int, torch.Tensor]:
    """Sums of ``a * b`` over every dim but one, for each requested axis (``IN_AXIS`` = input channels).

    Axes 0 and ``IN_AXIS`` of a weight come from one pass of :func:`pyobc.ops.weight_channel_sums`;
    other axes use :func:`pyobc.ops.channel_dot`; 1-D parameters are an elementwise product.
    """
    out: dict[int, torch.Tensor] = {}
    if a.dim() <= 1:
        prod = (a * b).reshape(-1)
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        out[0] = prod.to(acc)
        return out
    wanted = set(axes)
    if wanted & {0, IN_AXIS}:
        o, i = ops.weight_channel_sums(a, b, groups)
        if 0 in wanted:
            out[0] = o
        if IN_AXIS in wanted:
            out[IN_AXIS] = i
    for axis in wanted - {0, IN_AXIS}:
        out[axis] = ops.channel_dot(a, b, axis)
    return out


class Layout:
    """Index maps for a list of groups over a model's named parameters.

    Args:
        groups: the groups to score (from :func:`pyobc.grouping.build_groups`).
        params: qualified parameter name -> tensor (only shapes are read).

    Example:
        >>> import torch, torch.nn as nn
        >>> from pyobc.grouping import build_groups
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> layout = Layout(build_groups(net, torch.randn(2, 4)), dict(net.named_parameters()))
        >>> theta = {n: p.detach() for n, p in net.named_parameters()}
        >>> per_group = layout.split(layout.group_sum(layout.members(layout.sources(theta, theta))))
        >>> per_group[0].shape  # sum of squares of every weight removed with each of the 8 channels
        torch.Size([8])
    """

    def __init__(self, groups: Sequence[Group], params: Mapping[str, torch.Tensor],
                 activation: Callable[[Member], tuple[str, str, int] | None] | None = None):
        """``activation(member)`` may return ``(module, role, channels)`` to take that member's values
        from an activation-space source (role ``"out"`` or ``"in"`` of the module, ``channels`` long,
        indexed by ``member.index``) instead of its parameter slices."""
        self.groups = list(groups)
        source_axes, lengths, plan = _member_sources(self.groups, params, activation)
        self.source_keys: list[tuple] = list(source_axes)
        self.source_groups: dict[tuple, int] = {k: v for k, v in source_axes.items() if k[0] == "param"}
        self.source_lengths = lengths
        self.source_offsets: dict[tuple, int] = {}
        n = 0
        for key in self.source_keys:
            self.source_offsets[key] = n
            n += int(lengths[key])
        self.num_sources = n
        self._build_maps(plan)
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _build_maps(self, plan: list[list[tuple[tuple, torch.Tensor, torch.Tensor]]]) -> None:
        """The entry lists and CSR matrices of both levels, from each member's (source, index, root)."""
        src, dst, member_group = [], [], []
        self.member_offsets: list[list[int]] = []
        self.group_offsets: list[int] = []
        moff = goff = 0
        it = iter(plan)
        for g in self.groups:
            self.group_offsets.append(goff)
            offs = []
            for _ in g.members:
                offs.append(moff)
                for key, index, root in next(it):
                    src.append(self.source_offsets[key] + index)
                    dst.append(moff + root)
                member_group.append(torch.arange(goff, goff + g.size))
                moff += g.size
            self.member_offsets.append(offs)
            goff += g.size
        self.num_members = moff
        self.num_channels = goff
        self.group_offsets.append(goff)
        cat = (lambda xs: torch.cat(xs).long() if xs else torch.zeros(0, dtype=torch.long))
        # entry lists (kept for callers that read them): members[dst[e]] += sources[src[e]], and
        # member channel m belongs to group channel member_group[m]
        self.src = cat(src)
        self.dst = cat(dst)
        self.member_group = cat(member_group)
        # The same maps as CSR matrices (rows = outputs, entries in the original order within a
        # row), so that each level is ONE pyobc.ops.csr_gather_sum / csr_gather_reduce call.
        self.member_rowptr, self.member_col = _csr(self.dst, self.src, self.num_members)
        self.group_rowptr, self.group_col = _csr(
            self.member_group, torch.arange(self.num_members), self.num_channels)

    # -- index tensors on the data's device ----------------------------------------------------------
    def _maps(self, device: torch.device) -> dict[str, torch.Tensor]:
        maps = self._device_cache.get(device)
        if maps is None:
            sizes = torch.tensor([g.size for g in self.groups], dtype=torch.long)
            group_of = torch.repeat_interleave(torch.arange(len(self.groups)), sizes)
            maps = {
                "src": self.src, "dst": self.dst, "member_group": self.member_group,
                "member_rowptr": self.member_rowptr, "member_col": self.member_col,
                "group_rowptr": self.group_rowptr, "group_col": self.group_col,
                # group channels -> groups (for group_max)
                "groups_rowptr": torch.tensor(self.group_offsets, dtype=torch.long),
                "groups_col": torch.arange(self.num_channels),
                "group_of": group_of,
            }
            maps = {k: v.to(device) for k, v in maps.items()}
            self._device_cache[device] = maps
        return maps

    def _idx(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = self._maps(device)
        return maps["src"], maps["dst"], maps["member_group"]

    @property
    def params(self) -> list[str]:
        """Parameters whose slices are sources, in layout order."""
        return list(dict.fromkeys(k[1] for k in self.source_keys if k[0] == "param"))

    def sources(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Axis sums of ``a[p] * b[p]`` for every parameter source, concatenated (the sources level).

        A parameter missing from ``b`` (no gradient reached it) contributes zeros. Only for layouts
        whose sources are all parameter slices.
        """
        by_param: dict[str, dict[int, int]] = {}
        for key in self.source_keys:
            if key[0] != "param":
                raise ValueError("sources(a, b) needs a parameter-only layout")
            by_param.setdefault(key[1], {})[key[2]] = self.source_groups[key]
        sums_of: dict[tuple, torch.Tensor] = {}
        for name, axes in by_param.items():
            ta = a[name]
            tb = b.get(name)
            if tb is None:
                tb = torch.zeros_like(ta)
            for axis, t in axis_sums(ta, tb, list(axes), groups=axes.get(IN_AXIS, 1)).items():
                sums_of[("param", name, axis)] = t
        return torch.cat([sums_of[k] for k in self.source_keys])

    def members(self, sources: torch.Tensor) -> torch.Tensor:
        """Gather sources into member channels; works on ``(S,)`` or row-batched ``(R, S)`` input."""
        _check_last(sources, self.num_sources, "members", "sources")
        maps = self._maps(sources.device)
        if not _use_ops(sources):
            out = sources.new_zeros(sources.shape[:-1] + (self.num_members,))
            return out.index_add_(-1, maps["dst"], sources.index_select(-1, maps["src"]))
        return _csr_call(_csr_sum, sources, maps["member_rowptr"], maps["member_col"])

    def group_sum(self, members: torch.Tensor) -> torch.Tensor:
        """Sum member channels into group channels (``(..., M) -> (..., C)``)."""
        _check_last(members, self.num_members, "group_sum", "members")
        maps = self._maps(members.device)
        if not _use_ops(members):
            out = members.new_zeros(members.shape[:-1] + (self.num_channels,))
            return out.index_add_(-1, maps["member_group"], members)
        return _csr_call(_csr_sum, members, maps["group_rowptr"], maps["group_col"])

    def group_mean_nonzero(self, members: torch.Tensor) -> torch.Tensor:
        """Mean over the members whose value is non-zero, per group channel (OBA's group reduction)."""
        _check_last(members, self.num_members, "group_mean_nonzero", "members")
        if not _use_ops(members):
            total = self.group_sum(members)
            count = self.group_sum((members != 0).to(members.dtype))
            return total / count.clamp_min(1)
        maps = self._maps(members.device)
        return _csr_call(_csr_mean_nonzero, members, maps["group_rowptr"], maps["group_col"])

    def group_amax(self, members: torch.Tensor) -> torch.Tensor:
        """Maximum over members per group channel (``(M,) -> (C,)``)."""
        _check_last(members, self.num_members, "group_amax", "members")
        maps = self._maps(members.device)
        if not _use_ops(members):
            out = members.new_full((self.num_channels,), float("-inf"))
            return out.scatter_reduce(0, maps["member_group"], members, reduce="amax")
        return _csr_call(_csr_amax, members, maps["group_rowptr"], maps["group_col"])

    def group_max(self, channels: torch.Tensor) -> torch.Tensor:
        """Per-group maximum broadcast back to each channel of the group (``(C,) -> (C,)``)."""
        _check_last(channels, self.num_channels, "group_max", "channels")
        maps = self._maps(channels.device)
        if not _use_ops(channels):
            gmax = channels.new_full((len(self.groups),), float("-inf"))
            gmax = gmax.scatter_reduce(0, maps["group_of"], channels, reduce="amax")
        else:
            gmax = _csr_call(_csr_amax, channels, maps["groups_rowptr"], maps["groups_col"])
        return gmax.index_select(-1, maps["group_of"])

    def split(self, channels: torch.Tensor) -> list[torch.Tensor]:
        """Per-group views of a group-channel vector."""
        return [channels[..., a:b] for a, b in zip(self.group_offsets[:-1], self.group_offsets[1:])]

    def member_blocks(self, members: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per group, per member views of a member-channel vector."""
        out = []
        for g, offs in zip(self.groups, self.member_offsets):
            out.append([members[..., o:o + g.size] for o in offs])
        return out


# -- CSR helpers ----------------------------------------------------------------------------------

def _csr(rows: torch.Tensor, cols: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR form of the entry list ``out[rows[e]] += x[cols[e]]``: ``(rowptr, col)`` with the entries
    of each row in their original order (a stable sort), so sums keep the order of the entry list."""
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=num_rows) if rows.numel() else torch.zeros(num_rows, dtype=torch.long)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return rowptr, cols[order].contiguous()


_OP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _use_ops(x: torch.Tensor) -> bool:
    """Whether the compiled CSR ops can serve ``x``: a dense float tensor, outside forward-mode AD
    and functorch transforms (custom ops have neither a forward-AD formula nor a vmap rule; the
    index_select/index_add form serves those)."""
    return (x.dtype in _OP_DTYPES and x.layout == torch.strided and x.dim() >= 1
            and _forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active())


def _csr_sum(values, rowptr, col):
    return ops.csr_gather_sum(values, rowptr, col, check=False)


def _csr_amax(values, rowptr, col):
    return ops.csr_gather_reduce(values, rowptr, col, "amax", check=False)


def _csr_mean_nonzero(values, rowptr, col):
    return ops.csr_gather_reduce(values, rowptr, col, "mean_nonzero", check=False)


def _csr_call(fn, values: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``fn`` on ``(S,)`` / ``(R, S)`` input directly; other leading shapes are flattened to rows.
    (The maps are valid by construction: ``check=False`` skips the index-data check, a device sync
    on CUDA.)"""
    if values.dim() <= 2:
        return fn(values, rowptr, col)
    lead = values.shape[:-1]
    out = fn(values.reshape(-1, values.shape[-1]), rowptr, col)
    return out.reshape(lead + (out.shape[-1],))


def _check_last(x, n: int, method: str, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Layout.{method}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"Layout.{method}: {name} must have {n} entries in its last dim, "
                         f"got shape {tuple(x.shape)}")
