"""Generic training and evaluation helpers (nothing here depends on the digits data).

``train`` is also what pyobc uses to fine-tune pruned models.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress_bar, show_progress

__all__ = ["train", "evaluate", "RandomShift", "default_param_groups"]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy (a float in [0, 1]) of ``model`` over ``loader``'s ``(x, y)`` batches.

    The model runs in eval mode; its previous train/eval mode is restored afterwards.

    Example:
        >>> import torch
        >>> from pyobc.models import evaluate
        >>> net = torch.nn.Linear(4, 2)
        >>> evaluate(net, [(torch.eye(4), net(torch.eye(4)).argmax(1))])
        1.0
    """
    was_training = model.training
    device = _model_device(model)
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            pred = model(x).argmax(dim=1)
            correct += int((pred == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return correct / total


class RandomShift:
    """Augmentation: shift each image by a random integer offset in ``[-max_shift, max_shift]``
    along both spatial axes, filling with the edge values. Uses its own seeded generator, never
    torch's global RNG."""

    def __init__(self, max_shift: int = 1, seed: int = 0):
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
        self.max_shift = max_shift
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        if s == 0 or x.dim() != 4:
            return x
        n, _, h, w = x.shape
        offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=self.generator)
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        out = torch.empty_like(x)
        codes = offsets[:, 0] * (2 * s + 1) + offsets[:, 1]
        for code in torch.unique(codes).tolist():
            idx = (codes == code).nonzero().squeeze(1).to(x.device)
            dy, dx = divmod(code, 2 * s + 1)
            out[idx] = padded[idx, :, dy : dy + h, dx : dx + w]
        return out


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on weight matrices/kernels (ndim >= 2), none on biases, norm
    parameters and other 1-d parameters. Frozen parameters are left out.

    Example:
        >>> import torch
        >>> from pyobc.models import default_param_groups
        >>> [(len(g["params"]), g["weight_decay"]) for g in default_param_groups(torch.nn.Linear(4, 2), 5e-4)]
        [(1, 0.0005), (1, 0.0)]
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    t = min(max(t, 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - t)
    raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


def train(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    param_groups: Sequence[dict] | None = None,
    progress: bool | None = None,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    schedule: str = "cosine",
    warmup: float = 0.0,
    min_lr_ratio: float = 0.0,
    label_smoothing: float = 0.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> list[float]:
    """Train ``model`` in place on ``loader``'s ``(x, y)`` batches; returns the mean training loss
    of each epoch.

    Args:
        model: any module returning logits; it is moved nowhere (batches go to its device).
        loader: re-iterable source of ``(inputs, targets)`` batches (e.g. a DataLoader).
        epochs: number of passes over ``loader`` (0 does nothing).
        lr: peak learning rate (the schedule multiplies each param group's own ``lr``).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay, applied by default to
            parameters with ndim >= 2 only (see :func:`default_param_groups`).
        param_groups: optional torch-style parameter groups (dicts with ``"params"`` and optional
            ``"lr"``/``"weight_decay"``), e.g. to freeze or re-weight parts of a pruned model.
            Missing ``lr``/``weight_decay`` default to the arguments above.
        progress: show a tqdm bar (None: only when stderr is a terminal).
        optimizer: ``"sgd"`` (momentum, Nesterov by default) or ``"adamw"``.
        schedule: per-step ``"cosine"`` (default), ``"linear"`` decay to ``min_lr_ratio * lr``,
            or ``"constant"``; ``warmup`` is the fraction of all steps spent in linear warm-up.
        label_smoothing: for the default cross-entropy loss.
        augment: optional callable applied to each input batch (on the model's device), e.g.
            :class:`RandomShift`.
        loss_fn: replaces cross-entropy; called as ``loss_fn(logits, targets)``.
        max_grad_norm: clip the global gradient norm when given.

    The model is trained in train mode; its previous mode is restored at the end. Torch's global
    RNG is not used unless the model or ``augment`` use it.

    Example:
        >>> import torch
        >>> from pyobc.models import train
        >>> net = torch.nn.Linear(4, 2)
        >>> losses = train(net, [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))] * 4, epochs=3, lr=0.1)
        >>> len(losses), losses[-1] < losses[0]
        (3, True)
    """
    _check_train_args(epochs, lr, weight_decay, warmup)
    if epochs == 0:
        return []
    steps_per_epoch = _steps_per_epoch(loader)
    groups = _param_groups(model, param_groups, lr, weight_decay)
    opt = _optimizer(groups, optimizer, lr, momentum, nesterov, betas)
    scheduler = _scheduler(opt, epochs * steps_per_epoch, warmup, schedule, min_lr_ratio)
    if loss_fn is None:
        def loss_fn(logits, targets):
            return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    step = _TrainStep(model, _model_device(model), opt, scheduler, loss_fn, augment, max_grad_norm,
                      [p for g in groups for p in g["params"]])
    was_training = model.training
    model.train()
    history: list[float] = []
    bar = progress_bar(range(epochs), show_progress(progress), desc="train", unit="epoch", leave=False)
    try:
        for _ in bar:
            history.append(_train_epoch(step, loader))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        if hasattr(bar, "close"):
            bar.close()
        model.train(was_training)
    return history


def _check_train_args(epochs, lr, weight_decay, warmup) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")


def _steps_per_epoch(loader: Iterable) -> int:
    try:
        steps = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps = sum(1 for _ in loader)
    if steps == 0:
        raise ValueError("train: the loader yields no batches")
    return steps


def _param_groups(model: nn.Module, param_groups: Sequence[dict] | None, lr: float,
                  weight_decay: float) -> list[dict]:
    """The optimizer's groups: the caller's (copied, missing ``lr``/``weight_decay`` filled in) or
    :func:`default_param_groups`."""
    if param_groups is None:
        groups = default_param_groups(model, weight_decay)
    else:
        groups = []
        for g in param_groups:
            g = dict(g)
            g["params"] = [p for p in g["params"]]
            g.setdefault("weight_decay", weight_decay)
            groups.append(g)
    for g in groups:
        g.setdefault("lr", lr)
    if not any(len(g["params"]) for g in groups):
        raise ValueError("train: no trainable parameters")
    return groups


def _optimizer(groups: list[dict], name: str, lr: float, momentum: float, nesterov: bool,
               betas: tuple[float, float]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def _scheduler(opt: torch.optim.Optimizer, total: int, warmup: float, schedule: str,
               min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factors over ``total`` steps (warm-up, then ``schedule``)."""
    warmup_steps = int(round(warmup * total))
    _lr_factor(0, total, warmup_steps, schedule, min_lr_ratio)  # validates `schedule`
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: _lr_factor(step, total, warmup_steps, schedule, min_lr_ratio)
    )


@dataclasses.dataclass
class _TrainStep:
    """Everything one optimisation step needs (batches go to ``device``, the model's)."""

    model: nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    max_grad_norm: float | None
    params: list[torch.Tensor]


def _train_epoch(step: _TrainStep, loader: Iterable) -> float:
    """One pass over ``loader``; returns the mean training loss per sample."""
    loss_sum, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(step.device), y.to(step.device)
        if step.augment is not None:
            x = step.augment(x)
        loss = step.loss_fn(step.model(x), y)
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(step.params, step.max_grad_norm)
        step.optimizer.step()
        step.scheduler.step()
        loss_sum += float(loss.detach()) * y.shape[0]
        count += y.shape[0]
    return loss_sum / max(1, count)
