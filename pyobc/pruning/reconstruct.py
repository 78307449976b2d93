"""Layer-wise reconstruction: refit the layers that lost input channels so that their outputs match the
dense model's on calibration data, and the structured OBS error that selection can use.

The refit
---------
For a consumer layer (conv or linear) that lost input channels, with dense input ``x`` and dense output
``y = W x + b``, and ``x̂`` the kept inputs as the *pruned* model computes them (earlier layers already refit),
the new weights are the least-squares solution ::

    [W' b'] = argmin Σ_samples ‖y − W' x̂ − b'‖²  =  (Σ y x̂_aᵀ) (Σ x̂_a x̂_aᵀ + λ I_w)⁻¹,    x̂_a = [x̂; 1]

(one sample is one row of a linear layer's input, or one output position's input patch of a conv, from
:func:`torch.nn.functional.unfold`). ``λ = damping × mean(diag(Σ x̂ x̂ᵀ))`` on the weight block only (the
intercept is not shrunk). The intercept is fitted only when the layer has a bias (a bias-free conv followed
by BatchNorm keeps the plain fit: the BatchNorm statistics stay those of the dense output it targets).
Layers are processed in the pruned model's forward order, each from its own passes over the calibration
batches, stopped right after that layer: only one layer's moments exist at a time. A refit whose calibration
error would exceed that of the plainly sliced weights (possible only through damping) is not applied, and
the report says so.

The structured OBS error
------------------------
With ``H = Σ x_a x_aᵀ`` of the *dense* inputs (same damping) and ``S`` the weight columns of one input
channel, removing it and refitting the rest optimally leaves the output error
``tr(W_S ((H⁻¹)_SS)⁻¹ W_Sᵀ)``, against ``tr(W_S H_SS W_Sᵀ)`` when nothing is refit. :func:`obs_scores`
turns these into per-channel scores of every group (summed over the group's consumer layers).

Example:
    >>> import torch, torch.nn as nn, pyobc
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> data = [(torch.randn(64, 6), torch.zeros(64, dtype=torch.long)) for _ in range(2)]
    >>> scores = pyobc.score(net, data, "taylor")
    >>> small, report = pyobc.prune(net, scores, 0.5, reconstruct=data, damping=0.0)
    >>> fit = report.reconstruction.layers[0]
    >>> fit.name, fit.refit, fit.error_after <= fit.error_before
    ('2', True, True)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grouping import Group
from ..layers import CONV, LINEAR
from ..masking import removed_mask
from ..model_state import preserved_state, unwrap_model
from ..nested import map_tensors, tensors_in
from ..progress import progress_bar, show_progress
from ..scoring.batches import model_device
from ..scoring.scores import Scores
from .adapters import OBCAdapted
from .ignored import is_ignored, resolve_ignored
from .validation import check_scores

__all__ = ["LayerFit", "ReconstructionReport", "Calibration", "Target", "plan_targets", "not_refit", "refit",
           "obs_scores", "SELECTIONS", "calibration_for", "check_selection", "selection_scores"]

#: how :func:`pyobc.prune` chooses channels: by the criterion, by the OBS error alone, or both
SELECTIONS = ("scores", "obs", "scores*obs")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


@dataclasses.dataclass(frozen=True)
class LayerFit:
    """One refit layer: calibration error (mean over samples of ‖y − ŷ‖²) before and after the refit."""

    name: str
    inputs: int  #: live weight columns fitted (conv: channels × kernel taps)
    outputs: int
    samples: int  #: rows of the least-squares problem (conv: images × output positions)
    error_before: float  #: with the plainly sliced weights
    error_after: float  #: with the weights now in the layer
    energy: float  #: mean ‖y‖² of the dense output (to read the errors relative to it)
    refit: bool  #: False when the refit would have increased the error (damping) and was not applied


@dataclasses.dataclass
class ReconstructionReport:
    """What :func:`refit` did (``PruneReport.reconstruction``).

    ``seconds / pass_seconds`` is the cost in passes of the dense model over the calibration data;
    ``peak_bytes`` the largest working set of one layer (moments plus one batch of unfolded inputs).

    Example:
        >>> r = ReconstructionReport([LayerFit("fc", 4, 2, 100, 2.0, 1.0, 8.0, True)], 1, 100, 0.01, 0.5, 0.1, 1024)
        >>> round(r.passes, 1), r.layers[0].error_after / r.layers[0].energy
        (5.0, 0.125)
    """

    layers: list[LayerFit]
    batches: int
    samples: int
    damping: float
    seconds: float
    pass_seconds: float
    peak_bytes: int
    #: layers that lost input channels but are not refit (``nn.MultiheadAttention``: not reconstructed yet)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def passes(self) -> float:
        """Reconstruction time in units of one forward pass of the dense model over the calibration data."""
        return self.seconds / self.pass_seconds if self.pass_seconds > 0 else float("nan")

    def __str__(self) -> str:
        lines = [f"reconstruction: {len(self.layers)} layers, {self.batches} batches ({self.samples} samples), "
                 f"damping {self.damping:g}, {self.seconds:.2f} s = {self.passes:.1f} calibration passes, "
                 f"peak working set {self.peak_bytes / 2**20:.1f} MiB",
                 "", "| layer | inputs | rel. error before | rel. error after |", "|---|---:|---:|---:|"]
        for f in self.layers:
            e = max(f.energy, 1e-30)
            lines.append(f"| {f.name} | {f.inputs} | {f.error_before / e:.4f} | {f.error_after / e:.4f}"
                         f"{'' if f.refit else ' (not refit)'} |")
        if self.skipped:
            lines += ["", f"not refit (attention layers are not reconstructed yet): {', '.join(self.skipped)}"]
        return "\n".join(lines)


class Calibration:
    """Calibration batches held in memory, and how to run a model on one of them.

    ``loss_fn(model, batch)`` (the :func:`pyobc.score` contract) runs the model when given; otherwise a
    batch is a tensor (the inputs) or a tuple/list whose first element is the inputs.

    Example:
        >>> cal = Calibration([(torch.ones(2, 3), 0), (torch.zeros(2, 3), 1)], max_batches=1)
        >>> len(cal.batches), cal.samples
        (1, 2)
    """

    def __init__(self, loader: Iterable, max_batches: int | None = 8, loss_fn: Callable | None = None,
                 device: torch.device | None = None, moved: bool = True):
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise ValueError(f"reconstruct_batches must be a positive int or None, got {max_batches!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be a callable loss_fn(model, batch) or None")
        try:
            iterator = iter(loader)
        except TypeError:
            raise TypeError(f"reconstruct= must be an iterable of batches, got {type(loader).__name__}") from None
        self.loss_fn = loss_fn
        self.batches: list[Any] = []
        for i, batch in enumerate(iterator):
            if max_batches is not None and i >= max_batches:
                break
            if not tensors_in(batch):
                raise TypeError(f"calibration batch {i} holds no tensors (got {type(batch).__name__})")
            if loss_fn is None and not isinstance(batch, (torch.Tensor, tuple, list)):
                raise TypeError(f"calibration batch {i} is a {type(batch).__name__}: pass reconstruct_loss_fn "
                                "(loss_fn(model, batch)) to say how the model reads it")
            self.batches.append(map_tensors(lambda t: t.to(device), batch) if device is not None else batch)
        if not self.batches:
            raise ValueError("the calibration loader (reconstruct=) yielded no batch")
        first = [tensors_in(b)[0] for b in self.batches]
        self.samples = sum(int(t.shape[0]) if t.dim() else 1 for t in first)

    def run(self, model: nn.Module, batch: Any) -> None:
        """One forward pass of ``model`` on ``batch`` (no grad); a :class:`_Stop` from a hook ends it early."""
        with torch.no_grad():
            try:
                if self.loss_fn is not None:
                    self.loss_fn(model, batch)
                elif isinstance(batch, torch.Tensor):
                    model(batch)
                else:
                    model(batch[0])
            except _Stop:
                pass


@dataclasses.dataclass(frozen=True)
class Target:
    """A layer to refit: ``name`` in the dense model, ``module`` in the pruned one (``name.layer`` under an
    Equivalent Pruning adapter); ``rows``: the dense output rows the pruned layer's rows are; ``cols``: the
    pruned layer's input channels (features) that are live (None: all of them)."""

    name: str
    module: str
    rows: torch.Tensor
    cols: torch.Tensor | None


def _kept(groups: Sequence[Group], removals: Sequence[Mapping[str, torch.Tensor]], name: str, kind: str,
          size: int) -> torch.Tensor:
    """Positions (along a member's own axis) of layer ``name`` that no removal in ``removals`` cuts."""
    alive = torch.ones(size, dtype=torch.bool)
    for g in groups:
        for remove in removals:
            chosen = remove.get(g.root)
            if chosen is None or not len(chosen):
                continue
            mask = removed_mask(g, chosen)
            for m in g.members:
                if m.module == name and m.kind == kind:
                    alive[m.index[mask[m.root]]] = False
    return alive.nonzero().reshape(-1)


def _check_layer(name: str, layer: nn.Module) -> None:
    if isinstance(layer, LINEAR):
        return
    if not isinstance(layer, CONV) or layer.transposed:
        raise NotImplementedError(f"reconstruction refits conv and linear layers; {name} is a "
                                  f"{type(layer).__name__} (pass it in ignored_layers)")
    if layer.groups != 1:
        raise NotImplementedError(f"reconstruction does not refit grouped convolutions ({name} has groups="
                                  f"{layer.groups}); pass it in ignored_layers or prune without reconstruct")
    if layer.weight.dim() > 4 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise NotImplementedError(f"reconstruction refits Conv1d/Conv2d with numeric zero padding; {name} is "
                                  f"a {type(layer).__name__} with padding={layer.padding!r}, "
                                  f"padding_mode={layer.padding_mode!r}")


def _losing(groups: Sequence[Group], removals: Sequence[Mapping[str, torch.Tensor]], kind: str) -> list[Any]:
    """Members of ``kind`` in groups that some removal in ``removals`` takes channels from."""
    return [m for g in groups if any(len(r.get(g.root, ())) for r in removals) for m in g.members if m.kind == kind]


def not_refit(groups: Sequence[Group], cut: Mapping[str, torch.Tensor],
              dead: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Layers that lose input channels but that reconstruction leaves as they are (attention modules).

    Example:
        >>> not_refit([], {})
        []
    """
    return sorted({m.module for m in _losing(groups, (cut, dict(dead or {})), "attention")})


def plan_targets(dense: nn.Module, pruned: nn.Module, groups: Sequence[Group],
                 cut: Mapping[str, torch.Tensor], dead: Mapping[str, torch.Tensor] | None = None) -> list[Target]:
    """The layers that lost input channels: physically (``cut``: root -> removed channels) or behind an
    Equivalent Pruning input adapter (``dead``); unsupported layers raise NotImplementedError.

    Example:
        >>> from pyobc.grouping import build_groups
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> groups = build_groups(net, torch.randn(2, 4))
        >>> [(t.name, t.rows.numel()) for t in plan_targets(net, net, groups, {"0": torch.tensor([1, 2])})]
        [('2', 3)]
    """
    dead = dict(dead or {})
    names = {m.module for m in _losing(groups, (cut, dead), "in")}
    targets = []
    for name in sorted(names):
        layer = dense.get_submodule(name)
        _check_layer(name, layer)
        n_in = layer.weight.shape[1]
        now = _kept(groups, [cut], name, "in", n_in)
        live = _kept(groups, [cut, dead], name, "in", n_in)
        if live.numel() == now.numel() == n_in:
            continue
        rows = _kept(groups, [cut], name, "out", layer.weight.shape[0])
        held = pruned.get_submodule(name)
        module = f"{name}.layer" if isinstance(held, OBCAdapted) else name
        cols = None if live.numel() == now.numel() else torch.searchsorted(now, live)
        targets.append(Target(name, module, rows, cols))
    return targets


def _samples_in(layer: nn.Module, x: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as rows of a least-squares problem: (samples, live columns), float64."""
    if cols is not None:
        x = x.index_select(1 if isinstance(layer, CONV) else x.dim() - 1, cols.to(x.device))
    if isinstance(layer, LINEAR):
        return x.reshape(-1, x.shape[-1]).double()
    if x.dim() == 3:  # Conv1d as a Conv2d of height 1
        x = x.unsqueeze(2)
        k, d, p, s = ((1, *layer.kernel_size), (1, *layer.dilation), (0, *layer.padding), (1, *layer.stride))
    else:
        k, d, p, s = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    patches = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()


def _samples_out(layer: nn.Module, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The layer's output rows ``rows`` as (samples, outputs), float64, in :func:`_samples_in`'s order."""
    if isinstance(layer, LINEAR):
        return y.reshape(-1, y.shape[-1])[:, rows.to(y.device)].double()
    y = y.flatten(2).transpose(1, 2)  # (N, L, O)
    return y.reshape(-1, y.shape[-1])[:, rows.to(y.device)].double()


def _weight_matrix(layer: nn.Module, cols: torch.Tensor | None, bias: bool) -> torch.Tensor:
    """The layer's current live weights as (outputs, columns [+ 1 for the bias]), float64."""
    w = layer.weight.detach()
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    w = w.reshape(w.shape[0], -1).double()
    if bias:
        w = torch.cat([w, layer.bias.detach().double().reshape(-1, 1)], 1)
    return w


def _write(layer: nn.Module, cols: torch.Tensor | None, w: torch.Tensor, bias: bool) -> None:
    """Store ``w`` (as from :func:`_weight_matrix`) back into the layer."""
    weight = layer.weight
    if bias:
        layer.bias.data.copy_(w[:, -1].to(layer.bias.dtype))
        w = w[:, :-1]
    if cols is None:
        weight.data.copy_(w.reshape(weight.shape).to(weight.dtype))
    else:
        c = cols.to(weight.device)
        shape = (weight.shape[0], c.numel(), *weight.shape[2:])
        weight.data.index_copy_(1, c, w.reshape(shape).to(weight.dtype))


class _Moments:
    """Σ x̂_a x̂_aᵀ, Σ x̂_a yᵀ and Σ ‖y‖² over calibration samples (float64), ``x̂_a = [x̂; 1]`` with a bias."""

    def __init__(self, bias: bool):
        self.bias = bias
        self.h = self.b = None
        self.yy = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> int:
        """Add samples; returns the bytes of this update's working set."""
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        h = x.T @ x
        self.h = h if self.h is None else self.h + h
        if y is not None:
            b = x.T @ y
            self.b = b if self.b is None else self.b + b
            self.yy += float((y * y).sum())
        self.n += x.shape[0]
        return (x.numel() + 2 * h.numel() + (0 if y is None else y.numel() + 2 * self.b.numel())) * 8

    def damped(self, damping: float) -> torch.Tensor:
        """``H / n`` with ``damping × mean diagonal`` added to the weight block (not the intercept)."""
        h = self.h / self.n
        d = h.shape[0] - (1 if self.bias else 0)
        mean = float(h.diagonal()[:d].mean()) if d else 0.0
        lam = damping * mean if mean > 0 else damping  # all inputs zero: an absolute damping
        idx = torch.arange(d, device=h.device)
        h = h.clone()
        h[idx, idx] += lam
        return h

    def solve(self, damping: float, name: str) -> torch.Tensor:
        """The least-squares weights (outputs, columns [+ 1])."""
        chol, info = torch.linalg.cholesky_ex(self.damped(damping))
        if int(info) != 0:
            raise ValueError(f"the second-moment matrix of {name}'s kept inputs is singular (fewer independent "
                             f"calibration samples than inputs, or dead inputs); use damping > 0 or more batches")
        return torch.cholesky_solve(self.b / self.n, chol).T

    def error(self, w: torch.Tensor) -> float:
        """Mean over samples of ‖y − w x̂_a‖² (undamped)."""
        h, b = self.h / self.n, self.b / self.n
        return max(0.0, self.yy / self.n - 2.0 * float((w.T * b).sum()) + float(((w @ h) * w).sum()))


def _forward_order(cal: Calibration, model: nn.Module, modules: Sequence[str]) -> list[str]:
    """``modules`` in the order the model first calls them; a module called twice in one pass is refused."""
    calls: list[str] = []
    handles = [model.get_submodule(n).register_forward_hook(lambda *_a, n=n: calls.append(n)) for n in modules]
    try:
        cal.run(model, cal.batches[0])
    finally:
        for h in handles:
            h.remove()
    twice = sorted({n for n in calls if calls.count(n) > 1})
    if twice:
        raise NotImplementedError(f"reconstruction cannot refit layers called several times per forward: {twice}")
    missing = sorted(set(modules) - set(calls))
    if missing:
        raise ValueError(f"the calibration forward pass never called {missing}")
    return list(dict.fromkeys(calls))


def _capture(cal: Calibration, model: nn.Module, name: str, batch: Any, fn: Callable) -> Any:
    """Run ``model`` on ``batch`` up to module ``name`` and return ``fn(layer, input, output)``."""
    layer = model.get_submodule(name)
    out: list[Any] = []

    def hook(module, args, output):
        out.append(fn(module, args[0], output))
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        cal.run(model, batch)
    finally:
        handle.remove()
    if not out:
        raise ValueError(f"a calibration batch ran without calling {name}: reconstruction needs every batch to "
                         "reach every refit layer")
    return out[0]


def _refit_layer(cal: Calibration, dense: nn.Module, pruned: nn.Module, t: Target,
                 damping: float) -> tuple[LayerFit, int]:
    """Refit one target layer in place; returns its record and its peak working-set bytes."""
    layer = pruned.get_submodule(t.module)
    bias = layer.bias is not None
    moments = _Moments(bias)
    peak = 0
    for batch in cal.batches:
        y = _capture(cal, dense, t.name, batch, lambda m, x, out: _samples_out(m, out, t.rows))
        x = _capture(cal, pruned, t.module, batch, lambda m, x, out: _samples_in(m, x, t.cols))
        peak = max(peak, moments.add(x, y.to(x.device)))
    old = _weight_matrix(layer, t.cols, bias)
    new = moments.solve(damping, t.name)
    before, after = moments.error(old), moments.error(new)
    applied = after <= before
    if applied:
        _write(layer, t.cols, new, bias)
    fit = LayerFit(t.name, old.shape[1] - int(bias), old.shape[0], moments.n, before,
                   after if applied else before, moments.yy / moments.n, applied)
    return fit, peak


def _pass_seconds(cal: Calibration, model: nn.Module) -> float:
    t0 = time.perf_counter()
    for batch in cal.batches:
        cal.run(model, batch)
    return time.perf_counter() - t0


def _check_damping(damping: float) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    return float(damping)


def refit(dense: nn.Module, pruned: nn.Module, targets: Sequence[Target], cal: Calibration, *,
          damping: float = 0.01, progress: bool | None = None, skipped: Sequence[str] = ()) -> ReconstructionReport:
    """Refit ``targets`` of ``pruned`` in place, in forward order, against ``dense`` (neither model's
    train/eval flags change; both run in eval mode). ``skipped``: layers to name in the report as not refit.

    Example:
        >>> from pyobc.grouping import build_groups
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> small = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> groups = build_groups(net, torch.randn(2, 4))
        >>> targets = plan_targets(net, small, groups, {"0": torch.tensor([1, 2])})
        >>> refit(net, small, targets, Calibration([torch.randn(32, 4)])).layers[0].samples
        32
    """
    damping = _check_damping(damping)
    dense, pruned = unwrap_model(dense), unwrap_model(pruned)
    t0 = time.perf_counter()
    fits, peak = [], 0
    with preserved_state(dense), preserved_state(pruned):
        pass_seconds = _pass_seconds(cal, dense)
        by_module = {t.module: t for t in targets}
        order = _forward_order(cal, pruned, list(by_module)) if targets else []
        bar = progress_bar(order, show_progress(progress), desc="pyobc reconstruct", unit="layer", leave=False)
        for module in bar:
            fit, bytes_ = _refit_layer(cal, dense, pruned, by_module[module], damping)
            fits.append(fit)
            peak = max(peak, bytes_)
    return ReconstructionReport(fits, len(cal.batches), cal.samples, damping, time.perf_counter() - t0,
                                pass_seconds, peak, list(skipped))


def _channel_columns(layer: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """Weight-matrix columns of input channels (features) ``positions``: a conv channel owns its kernel taps."""
    taps = layer.weight[0, 0].numel() if isinstance(layer, CONV) else 1
    return (positions.reshape(-1, 1) * taps + torch.arange(taps)).reshape(-1)


def _layer_errors(cal: Calibration, model: nn.Module, name: str, members: Sequence[tuple[Group, Any]],
                  damping: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group root -> (OBS error, plain removal error) of each root channel, for consumer layer ``name``,
    both relative to the layer's mean output energy."""
    layer = model.get_submodule(name)
    _check_layer(name, layer)
    bias = layer.bias is not None
    moments = _Moments(bias)
    for batch in cal.batches:
        moments.add(_capture(cal, model, name, batch, lambda m, x, out: _samples_in(m, x, None)), None)
    h = moments.damped(damping)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = _weight_matrix(layer, None, bias)
    energy = max(float(((w @ (moments.h / moments.n)) * w).sum()), 1e-30)
    out = {}
    for g, m in members:
        obs, plain = torch.zeros(g.size, dtype=torch.float64), torch.zeros(g.size, dtype=torch.float64)
        for r in torch.unique(m.root).tolist():
            s = _channel_columns(layer, m.index[m.root == r]).to(h.device)
            ws = w[:, s]
            obs[r] = torch.trace(ws @ torch.linalg.solve(hinv[s][:, s], ws.T)).cpu()
            plain[r] = torch.trace(ws @ h[s][:, s] @ ws.T).cpu()
        out[g.root] = (obs / energy, plain / energy)
    return out


def obs_scores(model: nn.Module, scores: Scores, cal: Calibration, *, selection: str = "obs",
               damping: float = 0.01, roots: Collection[str] | None = None, progress: bool | None = None) -> Scores:
    """Scores for choosing channels with reconstruction in mind, computed on the dense ``model``.

    ``selection="obs"``: the structured OBS error of removing each channel (its output error in every
    consumer layer that the least-squares refit cannot undo, relative to that layer's output energy, summed
    over consumers). ``"scores*obs"``: the criterion's scores times the fraction of each channel's plain
    removal error that the refit cannot undo (OBS error / plain error, in [0, 1]): the criterion's estimate of
    the damage, reduced by what reconstruction will repair. Groups read by a layer that cannot be refit raise
    NotImplementedError (ignore them). Only the groups rooted at ``roots`` (default: all) are measured; the
    others keep their scores.

    Example:
        >>> import pyobc
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(64, 4)
        >>> s = pyobc.score(net, None, "magnitude", example_inputs=x[:2])
        >>> obs = obs_scores(net, s, Calibration([x]), selection="scores*obs")
        >>> obs.method, obs.values[0].shape
        ('magnitude*obs', torch.Size([8]))
    """
    if selection not in SELECTIONS[1:]:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    damping = _check_damping(damping)
    model = unwrap_model(model)
    measured = [g for g in scores.groups if roots is None or g.root in roots]
    consumers: dict[str, list[tuple[Group, Any]]] = {}
    for g in measured:
        for m in g.members:
            if m.kind == "in":
                consumers.setdefault(m.module, []).append((g, m))
    unread = [g.root for g in measured if not any(m.kind == "in" for m in g.members)]
    if unread:
        raise NotImplementedError(f"selection={selection!r} measures a channel's error in the layers that read it; "
                                  f"no conv/linear layer reads groups {unread} (pass them in ignored_layers)")
    obs = {g.root: torch.zeros(g.size, dtype=torch.float64) for g in scores.groups}
    plain = {g.root: torch.zeros(g.size, dtype=torch.float64) for g in scores.groups}
    with preserved_state(model):
        for name in progress_bar(sorted(consumers), show_progress(progress), desc="pyobc OBS", leave=False):
            for root, (o, p) in _layer_errors(cal, model, name, consumers[name], damping).items():
                obs[root] += o
                plain[root] += p
    values = []
    for g, v in zip(scores.groups, scores.values):
        if roots is not None and g.root not in roots:
            values.append(v)
        elif selection == "obs":
            values.append(obs[g.root])
        else:
            values.append(v.double() * (obs[g.root] / plain[g.root].clamp_min(1e-30)).clamp(0.0, 1.0))
    return Scores("obs" if selection == "obs" else f"{scores.method}*obs",
                  scores.groups, values, options={**scores.options, "selection": selection, "damping": damping},
                  batches=len(cal.batches), samples=cal.samples, signature=scores.signature)


def calibration_for(model: nn.Module, loader: Iterable | None, max_batches: int | None = 8,
                    loss_fn: Callable | None = None) -> Calibration | None:
    """A :class:`Calibration` on ``model``'s device from ``loader`` (None when ``loader`` is None).

    Example:
        >>> calibration_for(nn.Linear(3, 2), [torch.ones(4, 3)]).samples
        4
    """
    if loader is None:
        if loss_fn is not None:
            raise ValueError("reconstruct_loss_fn was given without reconstruct= data")
        return None
    return Calibration(loader, max_batches, loss_fn, model_device(unwrap_model(model)))


def check_selection(selection: str, cal: Calibration | None, damping: float) -> None:
    """ValueError unless ``selection`` is one of :data:`SELECTIONS` (the OBS ones with calibration data) and
    ``damping`` is a number >= 0.

    Example:
        >>> check_selection("scores", None, 0.01)
    """
    _check_damping(damping)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if selection != "scores" and cal is None:
        raise ValueError(f"selection={selection!r} needs calibration data: pass reconstruct=loader")


def selection_scores(model: nn.Module, scores: Scores, selection: str, cal: Calibration | None, *,
                     damping: float, ignored_layers: Sequence[nn.Module | str] = (),
                     progress: bool | None = None) -> Scores:
    """The scores :func:`pyobc.prune` ranks channels by: ``scores`` itself for ``selection="scores"``, else
    :func:`obs_scores` over the groups not ignored (which needs calibration data).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> import pyobc
        >>> s = pyobc.score(net, None, "magnitude", example_inputs=torch.randn(2, 4))
        >>> selection_scores(net, s, "scores", None, damping=0.01) is s
        True
    """
    check_selection(selection, cal, damping)
    if selection == "scores":
        return scores
    model = unwrap_model(model)
    check_scores(model, scores)
    ignored = resolve_ignored(model, ignored_layers)
    roots = {g.root for g in scores.groups if not is_ignored(g, ignored)}
    return obs_scores(model, scores, cal, selection=selection, damping=damping, roots=roots, progress=progress)
