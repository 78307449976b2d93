"""``pyobc.prune``: physically remove the lowest-scored channels of every group.

Scores and scope
----------------
``scope="global"`` ranks the channels of all groups together, so it is only meaningful when scores are
comparable across layers. The data-driven criteria estimate a loss change (``taylor``, ``obd``,
``jacobian``/``obc``, ``sosp-h``, ``sosp-i``, ``ec``, ``oracle``): they are on one scale, although groups
with many members (residual streams) sum more terms and tend to score higher. ``magnitude`` depends on
layer sizes and weight scales and is better used with ``scope="local"``. ``oba`` divides each group by its
maximum by default (``normalize="max"``), so every group's best channel scores 1: its global ranking
compares channels *relative to their group*, as the reference implementation does. ``scope="local"`` removes
the same fraction from every group and needs no comparability.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch.nn as nn

from ..scoring.scores import Scores
from .reconstruct import calibration_for, selection_scores
from .removal import perform_removal, plan_removal
from .report import PruneReport

__all__ = ["prune"]


def prune(model: nn.Module, scores: Scores, ratio: float, *, scope: str = "global",
          ignored_layers: Sequence[nn.Module | str] = (), round_to: int | None = None,
          max_layer_ratio: float = 0.95, inplace: bool = False, compensate: bool = False,
          target: str = "channels", example_inputs: Any = None, reconstruct: Iterable | None = None,
          reconstruct_batches: int | None = 8, damping: float = 0.01, reconstruct_loss_fn: Callable | None = None,
          selection: str = "scores", progress: bool | None = None) -> tuple[nn.Module, PruneReport]:
    """Physically remove the lowest-scored channels; returns ``(pruned_model, report)``.

    Every member of a group is cut together (producer rows and biases, norm channels and running
    statistics, consumer columns, residual partners, attention projections, bare parameters), as the
    :class:`~pyobc.grouping.Group` records in ``scores`` describe; the result is an ordinary, smaller model.

    Args:
        model: the model ``scores`` were computed on, as it is now (checked against ``scores.signature``).
        scores: from :func:`pyobc.score`.
        ratio: fraction of the ``target`` quantity to remove, in ``[0, 1)``.
        scope: ``"global"`` ranks all channels together (scores must be comparable across layers: see
            :mod:`pyobc.pruning.prune`); ``"local"`` removes the same fraction from every group.
        ignored_layers: modules or names whose width must not change (their groups are left whole).
        round_to: kept channel counts are multiples of it (a group smaller than it is left whole).
        max_layer_ratio: at most this fraction of any group is removed; at least one channel is kept.
        inplace: prune ``model`` itself; by default a pruned copy is returned and ``model`` is untouched.
        compensate: add the structured elimination-compensation bias shifts of the removed channels to the
            consumers' biases (needs ``ec`` scores; ValueError otherwise).
        target: ``"channels"`` (default), ``"params"`` or ``"macs"``: channels are taken in ascending score
            order until the reduction of that quantity, computed from the pruned shapes, reaches ``ratio``.
        example_inputs: inputs to measure MACs with (needed for ``target="macs"``; otherwise optional, the
            report then has no MACs). Also saved (one sample) in the plan, to rebuild groups on load.
        reconstruct: calibration data (an iterable of batches, as for :func:`pyobc.score`). After cutting,
            every conv/linear layer that lost input channels is refit by least squares so that its output on
            these batches matches the unpruned model's (layers in forward order, so later layers also
            compensate the residual error of earlier ones; biases absorb the mean shift): see
            :mod:`pyobc.pruning.reconstruct`. ``report.reconstruction`` has each layer's error before/after.
        reconstruct_batches: how many batches of ``reconstruct`` to use (None: all). They are held in memory.
        damping: added to the diagonal of the kept inputs' second-moment matrix, relative to its mean.
        reconstruct_loss_fn: ``loss_fn(model, batch)`` that runs the model on a batch (the
            :func:`pyobc.score` contract); by default a batch is the inputs or an ``(inputs, ...)`` pair.
        selection: ``"scores"`` ranks channels by ``scores``; ``"obs"`` by the structured OBS error (what the
            refit cannot undo, relative to each consumer's output energy); ``"scores*obs"`` by the scores
            times the fraction of the plain removal error that the refit cannot undo. Both need
            ``reconstruct``; the chosen removal is then reconstructed.
        progress: progress bars for reconstruction (None: when stderr is a terminal).

    Groups feeding attention keep equal head widths: every head loses the same number of channels, and the
    kept count is a multiple of ``group.divisor``. The plan of the call is appended to ``pruned.pyobc_plan``
    (see :func:`pyobc.save`). Optimizers must be created after pruning (parameters are new tensors).

    Raises:
        ValueError: ratio or options out of range, scores from another model (or another pruning state),
            a group whose layers are not in the model, ``compensate`` without ``ec`` scores.
        NotImplementedError: a group contains a layer pyobc cannot cut (named; ignore it).

    Example:
        >>> import torch, pyobc
        >>> model = pyobc.models.resnet20(in_channels=1, input_size=8, width=0.5)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> scores = pyobc.score(model, None, "magnitude", example_inputs=x)
        >>> small, report = pyobc.prune(model, scores, 0.5, scope="local", example_inputs=x)
        >>> small(x).shape, report.channels_after / report.channels_before
        (torch.Size([2, 10]), 0.5)
    """
    cal = calibration_for(model, reconstruct, reconstruct_batches, reconstruct_loss_fn)
    scores = selection_scores(model, scores, selection, cal, damping=damping, ignored_layers=ignored_layers,
                              progress=progress)
    removal = plan_removal(model, scores, ratio, scope=scope, ignored_layers=ignored_layers, round_to=round_to,
                           max_layer_ratio=max_layer_ratio, target=target, example_inputs=example_inputs)
    return perform_removal(removal, inplace=inplace, compensate=compensate, calibration=cal, damping=damping,
                           progress=progress)
