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

import contextlib
import dataclasses
import math
import os
import traceback
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from .attention_heads import HeadLayout, attention_layers, head_layouts, int_width_layers
from .errors import TracingError
from .fused_mlp import FusedMLP, fused_mlps
from .hidden_width import HiddenLayout, hidden_layout
from . import grouping_cache
from .grouping_search import SEARCH_SECONDS, search_groups
from .layers import CONV, LINEAR, is_grouped_conv, is_transposed_linear
from .model_state import preserved_state, unwrap_model
from .nested import tensors_in

__all__ = ["IN_AXIS", "HEAD_STRUCTURES", "channel_buckets", "Slice", "Member", "Group", "build_groups", "canonical_parameter_names"]

#: Axis tag for "input channels" of a conv/linear weight: axis 1, expanded by the layer's ``groups``
#: (for a grouped conv, input channel ``g*I_g + j`` lives at ``weight[g*O_g:(g+1)*O_g, j]``).
IN_AXIS = -1


@dataclasses.dataclass(frozen=True)
class Slice:
    """Part of one parameter that belongs to a group: ``param`` indexed by ``index`` along ``axis``.

    ``root[j]`` is the root channel that position ``index[j]`` belongs to (several positions may share a
    root channel, e.g. the in-features of a linear layer after a flatten). ``axis`` is a tensor axis, or
    :data:`IN_AXIS` for the (group-expanded) input channels of a conv/linear weight, with ``groups`` the
    layer's group count (also set on the output-channel slices of grouped, non-depthwise convolutions,
    whose groups must lose equal numbers of channels).
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

    ``divisor`` > 1 means the channel count must stay a multiple of it (attention heads; the group count of
    a grouped convolution, whose groups must keep equal widths).
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


def channel_buckets(group: Group) -> torch.Tensor | None:
    """Head index of each root channel for groups that feed attention (``divisor`` heads), else None.

    For ``nn.MultiheadAttention`` members a channel's head is its embedding channel's head; for the query
    heads of a grouped-query attention module (a ``heads`` member with ``divisor`` key/value heads) it is
    the key/value group the query head belongs to; for the channels of a grouped convolution (``divisor``
    groups) it is the convolution's group, so that every group keeps the same width.

    None also when the attention members disagree or heads are uneven (then only the kept count is
    constrained to a multiple of the head count)."""
    if group.divisor <= 1:
        return None
    heads = None
    for m in group.members:
        grouped = m.kind in ("out", "in") and any(s.groups > 1 for s in m.slices)
        if m.kind not in ("attention", "heads") and not grouped:
            continue
        if grouped and {s.groups for s in m.slices} != {group.divisor}:
            return None
        width = int(m.index.max()) + 1 if m.index.numel() else 0
        if width % group.divisor:
            return None
        h = torch.full((group.size,), -1, dtype=torch.long)
        h[m.root] = m.index // (width // group.divisor)
        if heads is None:
            heads = h
        elif not torch.equal(heads, h):
            return None
    if heads is None or bool((heads < 0).any()):
        return None
    counts = torch.bincount(heads, minlength=group.divisor)
    if bool((counts != counts[0]).any()):
        return None
    return heads



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

    if kind == "out" and is_transposed_linear(module):  # weight (in, out)
        add("weight", 1)
        add("bias", 0)
    elif kind == "in" and is_transposed_linear(module):
        add("weight", 0)
    elif kind == "out" or kind == "depthwise":
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
        (_transposed_linear_pruner(f), "out" if is_out else "in"),
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
        stack.extend(o for o in n.outputs if isinstance(o.module, dummy + (tp.ops._OutputOp,)))
    return False


_PRUNER_CACHE: dict[str, type] = {}


def _transposed_linear_pruner(tp_function: Any) -> type:
    """Torch-Pruning's description of a transposed linear layer (Hugging Face ``Conv1D``, see
    :func:`pyobc.layers.is_transposed_linear`): channel counts only, pyobc cuts layers itself."""
    if "cls" not in _PRUNER_CACHE:
        class TransposedLinearPruner(tp_function.BasePruningFunc):
            def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
                raise NotImplementedError("pyobc cuts layers itself (pyobc.pruning.slicing)")

            def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
                raise NotImplementedError("pyobc cuts layers itself (pyobc.pruning.slicing)")

            def get_out_channels(self, layer: nn.Module) -> int:
                return int(layer.weight.shape[1])

            def get_in_channels(self, layer: nn.Module) -> int:
                return int(layer.weight.shape[0])

        _PRUNER_CACHE["cls"] = TransposedLinearPruner
    return _PRUNER_CACHE["cls"]


def _call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` on ``inputs`` as pyobc calls it everywhere: a dict is keywords, a tuple/list positional."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _outputs_forward(forward_fn: Callable | None) -> Callable:
    """A forward function for the tracer that returns every tensor the model returns (inside tuples, dicts,
    ``ModelOutput``...) that depends on its parameters, each through a view of its own, so that each
    becomes an output node of the graph: the layers producing them (the logits, also when the model
    computes its loss itself from ``labels=``) are never pruned."""
    def forward(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
        out = forward_fn(model, inputs) if forward_fn is not None else _call_model(model, inputs)
        found = [t for t in tensors_in(out) if t.grad_fn is not None]
        if not found:
            raise ValueError(f"{type(model).__name__} returned no tensor that depends on its parameters "
                             f"(got {type(out).__name__}): pyobc cannot trace its layers")
        return [t.view_as(t) for t in found]
    return forward


def build_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_layers: Sequence[nn.Module | str] = (),
    forward_fn: Any = None,
    called: set[str] | None = None,
    progress: bool = False,
    seconds: float = SEARCH_SECONDS,
    cache: bool = True,
    heads: str = "kv",
    hidden: bool = False,
) -> list[Group]:
    """Find the prunable groups of ``model`` with Torch-Pruning's DependencyGraph.

    Layers whose out-channels are model outputs are not prunable and get no group: every tensor the
    model returns counts (inside tuples, dicts and ``ModelOutput``), so the logits stay whole also when
    the model computes its loss itself (``model(input_ids, labels=...)``). ``ignored_layers`` (modules or
    qualified names) removes every group that would prune them. Groups are also left out, with a
    warning that names them, when they would change the widths of an attention module that keeps its
    head layout in ``int`` attributes (:mod:`pyobc.attention_heads`), or when Torch-Pruning gave channel
    indices outside a tensor's shape. Tied parameters (``lm_head.weight is embed.weight``) are named by
    their first name in ``model.named_parameters()`` and appear once per group. A Hugging Face model's
    ``config.use_cache`` is turned off while tracing (and restored): the key/value cache is not a channel.
    The model's train/eval flags, parameters and ``.grad`` are left as they were. If ``called`` is a
    set, the names of the modules the tracing forward pass called are added to it (a module can own
    parameters that another module reads directly, like ``nn.MultiheadAttention.out_proj``).
    The group search is bounded (:mod:`pyobc.grouping_search`): ``progress`` shows a bar over the root
    layers, a root whose index lists explode is refused (and named in the warning), and a search longer
    than ``seconds`` raises :class:`~pyobc.errors.GroupSearchTimeout`. Groups are cached per
    model structure (:mod:`pyobc.grouping_cache`; ``cache=False`` traces anew).

    Attention modules whose head layout pyobc knows (:func:`pyobc.attention_heads.head_layouts`: timm's
    fused ``Attention``, Hugging Face Llama-family, BERT and GPT-2 attention) get one group each whose
    channels are whole heads, built from the module itself rather than traced: ``heads="kv"`` (default)
    makes a channel a key/value head together with the query heads that share it (one attention head
    where there is no grouped-query attention); ``heads="query"`` makes it one query head, with the same
    number cut from every key/value group. ``hidden=True`` adds the hidden width of a Llama-family decoder
    as one more group (:mod:`pyobc.hidden_width`; ValueError for other models).

    Raises:
        ValueError: the model has no prunable layer.
        NotImplementedError: a group contains a layer type pyobc cannot score (named in the message).
    """
    model = unwrap_model(model)
    if heads not in HEAD_STRUCTURES:
        raise ValueError(f"heads must be one of {HEAD_STRUCTURES}, got {heads!r}")
    ignored = _ignored_ids(model, ignored_layers)
    key = None
    if cache:
        ignored_names = [n for n, m in model.named_modules() if id(m) in ignored]
        key = grouping_cache.structure_key(model, example_inputs, forward_fn, ignored_names, seconds, heads, hidden)
    hit = grouping_cache.lookup(key) if key is not None else None
    if hit is None:
        hit = _build(model, example_inputs, ignored, forward_fn, progress, seconds, heads, hidden)
        if key is not None:
            grouping_cache.store(key, hit)
    groups, seen, message = hit
    if called is not None:
        called |= seen
    if message:
        warnings.warn(message, stacklevel=2)
    return list(groups)


def _build(model: nn.Module, example_inputs: Any, ignored: set[int], forward_fn: Any, progress: bool,
           seconds: float, heads: str, hidden: bool = False) -> tuple[tuple[Group, ...], frozenset[str], str]:
    """:func:`build_groups` without the cache: (groups, names of the modules the forward called, the
    warning to give, '' for none)."""
    hidden_dims = hidden_layout(model) if hidden else None  # before tracing: a model it does not fit fails fast
    import torch_pruning as tp  # imported on first use: it takes a second to import
    from torch_pruning.pruner import function as tp_function

    mlps = fused_mlps(model)
    protected = {**int_width_layers(model), **attention_layers(model),
                 **{n: f.module for f in mlps for n in (f.gate_up, f.down)}}
    transposed = {type(m) for m in model.modules() if is_transposed_linear(m)}
    pruner = _transposed_linear_pruner(tp_function)()
    with _torch_pruning_failures(model):
        dg, seen = _trace(tp, model, example_inputs, forward_fn, {t: pruner for t in transposed})
        converter = _GroupConverter(tp, tp_function, dg, model, ignored, protected)
        modules = dict(model.named_modules())
        skip_roots = [modules[n] for n in protected] + [m for m in model.modules() if id(m) in ignored]
        tp_groups, converter.skipped["search"] = search_groups(
            dg, model, converter.names, CONV + LINEAR + tuple(transposed), skip_roots, seconds=seconds,
            progress=progress)
        groups = [g for tp_group in tp_groups if (g := converter.convert(tp_group)) is not None]
    groups += converter.head_groups(model, seen, heads)
    for f in mlps:
        if f.module in seen and not any(id(model.get_submodule(n)) in ignored for n in (f.gate_up, f.down)):
            groups.append(_fused_mlp_group(model, f, converter.canonical))
            converter.rebuilt.add(f.module)
    if hidden_dims is not None:
        group = _hidden_group(model, hidden_dims, converter.canonical)
        if not any(id(model.get_submodule(m.module)) in ignored for m in group.members):
            groups.append(group)
    if converter.unsupported:
        raise NotImplementedError(
            "pyobc cannot score these layers, which are coupled to prunable channels: "
            + ", ".join(sorted(converter.unsupported))
            + ". Pass them in ignored_layers to leave their groups unscored.")
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer: pyobc prunes the out-channels of conv and "
            "linear layers that do not produce the model's output" + converter.summary())
    message, ungrouped = converter.message(), _ungrouped_tensors(model, groups)
    if ungrouped:
        message = f"{message}; {ungrouped}" if message else f"pyobc: {ungrouped}"
    return tuple(groups), frozenset(seen), message


def _ungrouped_tensors(model: nn.Module, groups: Sequence[Group]) -> str:
    """A warning (without its "pyobc: " prefix) for the parameters of three or more dims outside convolutions
    that no group touches (not position embeddings or class tokens: their first dim is 1), when
    they hold at least 1% of the model's parameters ('' else): Mixture-of-Experts layers of transformers 5
    keep their experts as one 3-d tensor per projection (``experts.gate_up_proj``: experts x rows x cols),
    which the tracer does not split into structures, so they stay whole without any other message."""
    grouped = {s.param for g in groups for m in g.members for s in m.slices}
    total = sum(p.numel() for p in model.parameters())
    left = {f"{name}.{k}" if name else k: p.numel() for name, m in model.named_modules() if not isinstance(m, CONV)
            for k, p in m.named_parameters(recurse=False)
            if p.dim() >= 3 and p.shape[0] > 1 and (f"{name}.{k}" if name else k) not in grouped}
    if not left or sum(left.values()) < 0.01 * total:
        return ""
    names = sorted(left)
    return (f"{len(left)} parameter(s) of three or more dims, {100 * sum(left.values()) / total:.0f}% of the "
            "model's parameters, are in no prunable group: they stay whole, and MAC counts leave out their "
            "arithmetic (e.g. Mixture-of-Experts weights stored as one tensor per projection): "
            + ", ".join(names[:6]) + (", ..." if len(names) > 6 else ""))


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


@contextlib.contextmanager
def _torch_pruning_failures(model: nn.Module) -> Iterator[None]:
    """Turn an exception raised inside Torch-Pruning's code (tracing, index mapping, group search) into one
    :class:`~pyobc.errors.TracingError`; pyobc's own errors and the model's pass through unchanged."""
    try:
        yield
    except Exception as exc:
        error = _tracing_error(model, exc)
        if error is None:
            raise
        raise error from exc


def _tracing_error(model: nn.Module, exc: Exception) -> TracingError | None:
    """A :class:`~pyobc.errors.TracingError` for ``exc`` when it was raised inside Torch-Pruning's own code
    (the model has run once before tracing, so its own errors surfaced then); None for anything else
    (a model that fails only under the tracer's hooks keeps its original error)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = frames[-1] if frames else None
    if where is None or f"{os.sep}torch_pruning{os.sep}" not in where.filename:
        return None
    path = where.filename[where.filename.rfind(f"{os.sep}torch_pruning{os.sep}") + 1:]
    text = " ".join(str(exc).split())
    return TracingError(
        f"Torch-Pruning's DependencyGraph, which pyobc uses to find coupled channels, failed on "
        f"{type(model).__name__}: {type(exc).__name__}{': ' + text if text else ''} in {where.name} "
        f"({path}:{where.lineno}). The model runs; its channel dependencies are what cannot be traced "
        "(Torch-Pruning does not map some reshapes and permutations of the channel axis, such as "
        "ShuffleNet's channel shuffle). ignored_layers cannot help: the whole forward is traced")


def _trace(tp: Any, model: nn.Module, example_inputs: Any, forward_fn: Any,
           customized: dict[type, Any]) -> tuple[Any, set[str]]:
    """Torch-Pruning's DependencyGraph of ``model``, and the names of the modules the forward called."""
    seen: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.add(n)) for n, m in model.named_modules()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache:  # a Hugging Face key/value cache concatenates along the sequence: not channels
            config.use_cache = False
        with preserved_state(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about every unwrapped parameter
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, forward_fn=_outputs_forward(forward_fn), verbose=False,
                    customized_pruners=customized or None)
    finally:
        if use_cache:
            config.use_cache = use_cache
        for h in handles:
            h.remove()
    return dg, seen


def canonical_parameter_names(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter (tied ones have several) -> its first name in ``named_parameters()``.

    Example:
        >>> import torch.nn as nn
        >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight
        >>> canonical_parameter_names(nn.ModuleDict({"emb": emb, "head": head}))
        {'emb.weight': 'emb.weight', 'head.weight': 'emb.weight'}
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def _axis_length(shape: tuple[int, ...], sl: Slice) -> int:
    """How many positions ``sl`` can index in a tensor of ``shape``."""
    if sl.axis == IN_AXIS:
        return int(shape[1]) * sl.groups
    return int(shape[sl.axis]) if len(shape) else 1


def _dedup_slices(members: list[Member]) -> list[Member]:
    """The members with every slice that an earlier member already lists (a tied tensor reached twice)
    removed; the member itself stays (its module's attributes still follow the cut)."""
    seen: set[tuple] = set()
    out = []
    for m in members:
        kept = []
        for sl in m.slices:
            axis = 1 if sl.axis == IN_AXIS and sl.groups == 1 else sl.axis
            key = (sl.param, axis, tuple(sl.index.tolist()), tuple(sl.root.tolist()))
            if key not in seen:
                seen.add(key)
                kept.append(sl)
        out.append(m if len(kept) == len(m.slices) else dataclasses.replace(m, slices=tuple(kept)))
    return out


class _GroupConverter:
    """Turns Torch-Pruning groups of one model into :class:`Group` records; collects the names of
    coupled layers pyobc cannot score in :attr:`unsupported`, and the groups it leaves out (attention
    widths, out-of-range indices) in :attr:`skipped`."""

    def __init__(self, tp: Any, tp_function: Any, dg: Any, model: nn.Module, ignored: set[int],
                 protected: dict[str, str]):
        self.tp, self.tp_function, self.dg, self.ignored = tp, tp_function, dg, ignored
        self.protected = protected
        self.names = {id(m): n for n, m in model.named_modules()}
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.canonical = canonical_parameter_names(model)
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.unsupported: set[str] = set()
        self.skipped: dict[str, list[str]] = {"attention": [], "indices": [], "search": [], "tied": []}
        self.tied_owners: dict[str, set[str]] = {}  # a tied parameter's first name -> every module holding it
        for alias, first in self.canonical.items():
            if alias != first:
                self.tied_owners.setdefault(first, {first.rpartition(".")[0]}).add(alias.rpartition(".")[0])
        self.heads: list[str] = []
        self.touched_attention: list[set[str]] = []  # per skipped["attention"] entry: the attention modules
        self.rebuilt: set[str] = set()  # other protected modules whose groups pyobc builds itself (fused MLPs)

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
            if member.kind in ("out", "in") and is_grouped_conv(item.dep.target.module):
                divisor = math.lcm(divisor, int(item.dep.target.module.groups))
            members.append(member)
        if not members:
            return None
        root_member = members[0]
        if self._refused(root_member.module, members):
            return None
        size = int(root_member.root.max().item()) + 1 if root_member.root.numel() else 0
        return Group(root=root_member.module, size=size, members=tuple(_dedup_slices(members)), divisor=divisor)

    def _refused(self, root: str, members: list[Member]) -> bool:
        """Whether the group touches an attention module's projections or indexes outside a tensor
        (recorded in :attr:`skipped`)."""
        attention = sorted({self.protected[m.module] for m in members if m.module in self.protected})
        if attention:
            self.touched_attention.append(set(attention))
            self.skipped["attention"].append(f"{root} (widths of {', '.join(attention)})")
            return True
        modules = {m.module for m in members}
        for param in {sl.param for m in members for sl in m.slices}:
            outside = sorted(self.tied_owners.get(param, set()) - modules)
            if outside:  # a tied weight (an LM head tied to the embedding) read by a layer the group does not cut
                self.skipped["tied"].append(f"{root} ({param} is also used by {', '.join(outside)})")
                return True
        for m in members:
            for sl in m.slices:
                n = _axis_length(self.shapes[sl.param], sl)
                if sl.index.numel() and (int(sl.index.min()) < 0 or int(sl.index.max()) >= n):
                    self.skipped["indices"].append(
                        f"{root} (Torch-Pruning indexed {sl.param} up to {int(sl.index.max())} along an axis "
                        f"of {n}, member {m.module} ({m.module_type}))")
                    return True
        return False

    def head_groups(self, model: nn.Module, seen: set[str], structure: str) -> list[Group]:
        """One group per attention module whose whole heads pyobc can prune (:func:`_head_group`), for
        the modules the forward called and no ignored layer touches."""
        out = []
        for h in head_layouts(model):
            names = (h.module, h.q, h.k, h.v, h.out)
            if h.module in seen and not any(id(model.get_submodule(n)) in self.ignored for n in names):
                out.append(_head_group(model, h, self.canonical, structure))
                self.heads.append(h.module)
        return out

    def summary(self) -> str:
        """The groups left out, as sentences for messages ('' when none)."""
        parts = []
        modules = sorted({name or "<model>" for name in self.protected.values()} - set(self.heads) - self.rebuilt)
        if self.skipped["attention"]:
            parts.append("; groups left whole because they would change attention widths: "
                         + ", ".join(self.skipped["attention"]))
        if modules:
            parts.append(f"; the widths of {len(modules)} module(s) that keep head layouts or widths in int "
                         "attributes are left whole (attention projections, layers of that width, and every group "
                         "coupled to them): " + ", ".join(modules[:8]) + (", ..." if len(modules) > 8 else "")
                         + (f" ({len(self.heads)} other attention module(s) lose whole heads instead)"
                            if self.heads else ""))
        if self.skipped["indices"]:
            parts.append("; groups refused because Torch-Pruning's channel indices fall outside the tensors: "
                         + ", ".join(self.skipped["indices"]))
        if self.skipped["tied"]:
            parts.append("; groups left whole because they would cut a tied parameter that another layer also "
                         "reads: " + ", ".join(self.skipped["tied"]))
        if self.skipped["search"]:
            parts.append("; groups refused because Torch-Pruning's index lists exploded (reshapes that fold "
                         "positions into channels) when rooted at: " + ", ".join(self.skipped["search"]))
        return "".join(parts)

    def message(self) -> str:
        """One warning naming the groups left out ('' when none)."""
        # a model whose every attention module loses whole heads keeps its hidden width by design: no warning
        quiet = all(t <= set(self.heads) | self.rebuilt for t in self.touched_attention)
        other = any(v for k, v in self.skipped.items() if k != "attention")
        if set(self.protected.values()) - set(self.heads) - self.rebuilt or other or not quiet:
            return "pyobc: " + self.summary()[2:]
        return ""

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
        slices = [dataclasses.replace(sl, param=self.canonical.get(sl.param, sl.param))
                  for sl in _slices_for(kind, target, name, index, root, pruning_dim=dep.target.pruning_dim)]
        if kind == "out" and is_grouped_conv(target):  # the layer's group count, for equal cuts per group
            slices = [dataclasses.replace(sl, groups=int(target.groups)) for sl in slices]
        return Member(name, kind, module_type, index, root, tuple(slices)) if slices else None


#: what a channel of an attention module's head group is (the ``heads`` argument of :func:`build_groups`)
HEAD_STRUCTURES = ("kv", "query")


def _head_positions(h: HeadLayout, heads: torch.Tensor, offset: int) -> torch.Tensor:
    """Rows (or columns) ``offset + head * head_dim + [0, head_dim)`` of ``heads``, in head order."""
    return (offset + heads[:, None] * h.head_dim + torch.arange(h.head_dim)).reshape(-1)


def _head_group(model: nn.Module, h: HeadLayout, canonical: dict[str, str], structure: str) -> Group:
    """The group whose channels are the heads of one attention module (:class:`HeadLayout`).

    ``structure="kv"``: a channel is a key/value head with every query head that shares it (its q, k and v
    rows and its query heads' columns of the output projection); without grouped-query attention that is
    one attention head. ``"query"``: a channel is one query head (q rows and output columns); the key/value
    heads stay, and the group's ``divisor`` (the key/value head count) makes every key/value group lose the
    same number of query heads. A ``heads`` member carries the module, whose attributes follow the cut.
    """
    per_kv = h.num_heads // h.num_kv_heads
    q_heads = torch.arange(h.num_heads)
    by_kv = structure == "kv" or per_kv == 1
    q_root = q_heads // per_kv if by_kv else q_heads
    q_off, k_off, v_off = h.row_offsets()
    rows: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def add(layer: str, heads: torch.Tensor, roots: torch.Tensor, offset: int) -> None:
        idx, root = rows.setdefault(layer, ([], []))
        idx.append(_head_positions(h, heads, offset))
        root.append(roots.repeat_interleave(h.head_dim))

    add(h.q, q_heads, q_root, q_off)
    if by_kv:
        kv = torch.arange(h.num_kv_heads)
        add(h.k, kv, kv, k_off)
        add(h.v, kv, kv, v_off)
    members = []
    for layer, (idx, root) in rows.items():
        members.append(_named_member(model, layer, "out", torch.cat(idx), torch.cat(root), canonical))
    cols = _head_positions(h, q_heads, 0)
    members.append(_named_member(model, h.out, "in", cols, q_root.repeat_interleave(h.head_dim), canonical))
    size = h.num_kv_heads if by_kv else h.num_heads
    channels = torch.arange(size)
    members.append(Member(h.module, "heads", type(model.get_submodule(h.module)).__name__, channels, channels, ()))
    return Group(root=h.q, size=size, members=tuple(members), divisor=1 if by_kv else h.num_kv_heads)


def _named_member(model: nn.Module, layer: str, kind: str, index: torch.Tensor, root: torch.Tensor,
                  canonical: dict[str, str]) -> Member:
    module = model.get_submodule(layer)
    slices = tuple(dataclasses.replace(sl, param=canonical.get(sl.param, sl.param))
                   for sl in _slices_for(kind, module, layer, index, root))
    return Member(layer, kind, type(module).__name__, index, root, slices)


def _fused_mlp_group(model: nn.Module, f: FusedMLP, canonical: dict[str, str]) -> Group:
    """The neurons of a fused gated MLP (:mod:`pyobc.fused_mlp`): rows ``i`` and ``I + i`` of ``gate_up_proj``
    and column ``i`` of ``down_proj``."""
    idx = torch.arange(f.width)
    members = (_named_member(model, f.gate_up, "out", torch.cat([idx, idx + f.width]), idx.repeat(2), canonical),
               _named_member(model, f.down, "in", idx, idx, canonical))
    return Group(root=f.gate_up, size=f.width, members=members)


def _hidden_group(model: nn.Module, layout: HiddenLayout, canonical: dict[str, str]) -> Group:
    """The group whose channels are a Llama-family decoder's hidden width (:mod:`pyobc.hidden_width`):
    the embedding's columns, the readers' input columns, the writers' output rows, and ``hidden_norm``
    members for the norms over it (their weights are rescaled after a cut, see :mod:`pyobc.pruning.slicing`)."""
    idx = torch.arange(layout.width)
    members = [_named_member(model, layout.embedding, "embedding", idx, idx, canonical)]
    members += [_named_member(model, n, "out", idx, idx, canonical) for n in layout.writers]
    members += [_named_member(model, n, "in", idx, idx, canonical) for n in layout.readers]
    for n in layout.norms:
        norm = model.get_submodule(n)
        slices = tuple(Slice(canonical.get(f"{n}.{a}", f"{n}.{a}"), 0, idx, idx) for a in ("weight", "bias")
                       if getattr(norm, a, None) is not None)
        members.append(Member(n, "hidden_norm", type(norm).__name__, idx, idx, slices))
    return Group(root=layout.embedding, size=layout.width, members=tuple(_dedup_slices(members)))


#: returned by :meth:`_GroupConverter._member` for a dependency that makes its whole group unprunable
_SKIP_GROUP = object()
