"""``pyobc compare``: several criteria on one model and data, pruned physically at several ratios.

For each method the model is scored once; for each ratio the lowest-scored channels are removed with
:func:`pyobc.prune` (``target="macs"``, so the ratio is the fraction of MACs removed; the fraction actually
achieved is recorded) and the pruned model is evaluated without fine-tuning. The results are a table
(:func:`write_table`), a plot of accuracy against the fraction of MACs removed (:func:`plot_accuracy`) and,
at one ratio, the fraction of each layer's channels every method keeps (:func:`plot_layer_profile`,
:func:`write_layer_table`): the layers a method thins least are the architectural bottlenecks that the
SOSP paper suggests widening.

Example:
    >>> import pyobc
    >>> from pyobc.compare import run_compare, write_table
    >>> model = pyobc.models.trained("resnet20", image_size=8, channels=1, epochs=3)        # doctest: +SKIP
    >>> train = pyobc.datasets.digits("train", batch_size=64, image_size=8, channels=1)     # doctest: +SKIP
    >>> test = pyobc.datasets.digits("test", batch_size=256, image_size=8, channels=1)      # doctest: +SKIP
    >>> result = run_compare(model, train, test, ["magnitude", "jacobian"], [0.2, 0.5])   # doctest: +SKIP
    >>> write_table(result, "compare.csv")                                                 # doctest: +SKIP
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import os
import time
from typing import Any, Callable, Iterable, Sequence, TextIO

import torch
import torch.nn as nn

import pyobc

from .models import evaluate
from .progress import progress_bar, show_progress

__all__ = ["CompareRow", "CompareResult", "default_scope", "run_compare", "write_table", "write_layer_table",
           "plot_accuracy", "plot_layer_profile", "PlotUnavailable", "require_matplotlib"]


class PlotUnavailable(ImportError):
    """matplotlib is not installed (``pip install matplotlib`` or ``pip install 'pyobc[plot]'``)."""


@dataclasses.dataclass
class CompareRow:
    """One (method, ratio): what was removed and the accuracy without fine-tuning."""

    method: str
    scope: str
    target_ratio: float
    macs_removed: float  #: fraction of MACs actually removed
    params_removed: float
    macs_after: int
    params_after: int
    accuracy: float
    score_seconds: float
    #: accuracy after the same pruning with ``reconstruct=`` (no fine-tuning); None when not measured
    reconstructed_accuracy: float | None = None


@dataclasses.dataclass
class CompareResult:
    """Everything :func:`run_compare` measured."""

    rows: list[CompareRow]
    baseline_accuracy: float
    params_before: int
    macs_before: int
    profile_ratio: float
    #: group roots in model order, their channel counts, and per method the channels kept at ``profile_ratio``
    layers: list[str]
    layer_sizes: list[int]
    kept: dict[str, list[int]]
    title: str = ""

    def kept_fraction(self, method: str) -> list[float]:
        """Per layer, the fraction of channels ``method`` keeps at ``profile_ratio``.

        Example:
            >>> from pyobc.compare import CompareResult
            >>> r = CompareResult([], 0.9, 100, 1000, 0.5, ["conv1", "fc"], [16, 8], {"oba": [8, 6]})
            >>> r.kept_fraction("oba")
            [0.5, 0.75]
        """
        return [k / max(1, n) for k, n in zip(self.kept[method], self.layer_sizes)]


def default_scope(method: str) -> str:
    """``"local"`` for ``magnitude`` (its scores are not comparable across layers), ``"global"`` otherwise.

    Example:
        >>> default_scope("magnitude"), default_scope("oba")
        ('local', 'global')
    """
    return "local" if method == "magnitude" else "global"


def _evaluate(model: nn.Module, loader: Iterable, device: torch.device | None) -> float:
    if device is not None:
        model = model.to(device)
    return float(evaluate(model, loader))


def run_compare(model: nn.Module, loader: Iterable, eval_loader: Iterable, methods: Sequence[str],
                ratios: Sequence[float], *, example_inputs: Any, max_batches: int | None = 8,
                scope: str | None = None, device: str | torch.device | None = None,
                loss_fn: Callable | None = None, profile_ratio: float | None = None,
                progress: bool | None = None, log: TextIO | None = None,
                method_options: dict[str, Any] | None = None, reconstruct: bool = False,
                damping: float = 0.01) -> CompareResult:
    """Score ``model`` with every method, prune it at every ratio of MACs, evaluate each pruned copy.

    Args:
        model: the trained model (not modified).
        loader: batches to score on; ``eval_loader``: ``(inputs, targets)`` batches for top-1 accuracy.
        methods, ratios: criteria names and fractions of MACs to remove, each in ``[0, 1)``.
        example_inputs: model inputs to count MACs with (a couple of samples are enough).
        max_batches: scoring batches per method (None: the whole loader).
        scope: ``"global"`` or ``"local"``; None picks :func:`default_scope` per method.
        device: score and evaluate on this device.
        profile_ratio: the ratio whose per-layer widths are kept (default: the ratio closest to 0.5).
        log: where to write one line per method as it finishes (None: nowhere).
        reconstruct: also prune every (method, ratio) with ``pyobc.prune(..., reconstruct=loader)`` (the
            layers that lost inputs refit on ``max_batches`` batches of ``loader``, ``damping`` as there) and
            record that accuracy too (``reconstructed_accuracy``).

    Example:
        >>> # result = run_compare(model, train, test, ["oba", "jacobian"], [0.3, 0.5], example_inputs=x)
        >>> # [(r.method, r.macs_removed, r.accuracy) for r in result.rows]
    """
    ratios = sorted({float(r) for r in ratios})
    methods = list(dict.fromkeys(methods))
    if not ratios or not methods:
        raise ValueError("give at least one method and one ratio")
    if profile_ratio is None:
        profile_ratio = min(ratios, key=lambda r: (abs(r - 0.5), -r))
    if profile_ratio not in ratios:
        ratios = sorted(ratios + [float(profile_ratio)])
    dev = torch.device(device) if device is not None else None
    params_before, macs_before = pyobc.count(model, example_inputs)
    baseline = _evaluate(_copy_to(model, dev), eval_loader, None)
    result = CompareResult([], baseline, int(params_before), int(macs_before or 0), profile_ratio, [], [], {})
    bar = progress_bar(None, show_progress(progress), total=len(methods) * len(ratios), desc="pyobc compare",
                       unit="prune")
    try:
        for method in methods:
            t0 = time.perf_counter()
            scores = pyobc.score(model, loader, method, loss_fn=loss_fn, max_batches=max_batches, device=dev,
                                 progress=False, **(method_options or {}))
            seconds = time.perf_counter() - t0
            method_scope = scope or default_scope(method)
            for ratio in ratios:
                pruned, report = pyobc.prune(model, scores, ratio, scope=method_scope, target="macs",
                                             example_inputs=example_inputs)
                accuracy = _evaluate(pruned, eval_loader, dev)
                result.rows.append(_row(result, method, method_scope, ratio, report, accuracy, seconds))
                if reconstruct:
                    rebuilt, _ = pyobc.prune(model, scores, ratio, scope=method_scope, target="macs",
                                             example_inputs=example_inputs, reconstruct=loader,
                                             reconstruct_batches=max_batches, reconstruct_loss_fn=loss_fn,
                                             damping=damping)
                    result.rows[-1].reconstructed_accuracy = _evaluate(rebuilt, eval_loader, dev)
                if ratio == profile_ratio:
                    _record_kept(result, model, method, report)
                if bar is not None:
                    bar.update()
            if log is not None:
                _log_method(log, result.rows[-len(ratios):])
    finally:
        if bar is not None:
            bar.close()
    return result


def _row(result: CompareResult, method: str, scope: str, ratio: float, report: pyobc.PruneReport,
         accuracy: float, seconds: float) -> CompareRow:
    """The row of ``method`` pruned at ``ratio``; fractions removed are relative to ``result``'s unpruned model."""
    macs_after = int(report.macs_after or 0)
    return CompareRow(method, scope, ratio, 1.0 - macs_after / max(1, result.macs_before),
                      1.0 - report.params_after / max(1, result.params_before), macs_after,
                      int(report.params_after), accuracy, seconds)


def _record_kept(result: CompareResult, model: nn.Module, method: str, report: pyobc.PruneReport) -> None:
    """Store the channels ``method`` keeps per layer at the profile ratio (the layers, on first use)."""
    if not result.layers:  # in model order (the report lists groups as the tracer found them)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        widths_sorted = sorted(report.layers, key=lambda w: order.get(w.root, len(order)))
        result.layers = [w.root for w in widths_sorted]
        result.layer_sizes = [w.total for w in widths_sorted]
    kept = {w.root: w.kept for w in report.layers}
    result.kept[method] = [kept.get(root, n) for root, n in zip(result.layers, result.layer_sizes)]


def _log_method(log: TextIO, rows: Sequence[CompareRow]) -> None:
    """One line for a method that has finished: its scoring time and accuracy at every ratio."""
    first = rows[0]
    print(f"  {first.method}: scored in {first.score_seconds:.2f} s ({first.scope} scope); accuracy "
          + ", ".join(f"{r.accuracy:.1%}" for r in rows) + " at " + ", ".join(f"{r.target_ratio:g}" for r in rows)
          + " of MACs removed"
          + ("" if first.reconstructed_accuracy is None else "; reconstructed "
             + ", ".join(f"{r.reconstructed_accuracy:.1%}" for r in rows)), file=log, flush=True)


def _copy_to(model: nn.Module, device: torch.device | None) -> nn.Module:
    if device is None:
        return model
    return copy.deepcopy(model).to(device)


_COLUMNS = ("method", "scope", "target_ratio", "macs_removed", "params_removed", "macs_after", "params_after",
            "accuracy", "reconstructed_accuracy", "score_seconds")


def _table_rows(result: CompareResult) -> list[list[str]]:
    out = [["(unpruned)", "", "0", "0.0000", "0.0000", str(result.macs_before), str(result.params_before),
            f"{result.baseline_accuracy:.4f}", "", ""]]
    for r in result.rows:
        out.append([r.method, r.scope, f"{r.target_ratio:g}", f"{r.macs_removed:.4f}", f"{r.params_removed:.4f}",
                    str(r.macs_after), str(r.params_after), f"{r.accuracy:.4f}",
                    "" if r.reconstructed_accuracy is None else f"{r.reconstructed_accuracy:.4f}",
                    f"{r.score_seconds:.3f}"])
    return out


def _write(header: Sequence[str], rows: list[list[str]], path: str | os.PathLike, fmt: str) -> None:
    if fmt == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
    elif fmt == "md":
        buf = io.StringIO()
        buf.write("| " + " | ".join(header) + " |\n")
        buf.write("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|\n")
        for row in rows:
            buf.write("| " + " | ".join(row) + " |\n")
        with open(path, "w") as fh:
            fh.write(buf.getvalue())
    else:
        raise ValueError(f"format must be 'csv' or 'md', got {fmt!r}")


def write_table(result: CompareResult, path: str | os.PathLike, fmt: str = "csv") -> None:
    """The comparison table, one row per (method, ratio) after an ``(unpruned)`` row, as CSV or Markdown.

    Columns: method, scope, target_ratio, macs_removed and params_removed (fractions actually removed),
    macs_after (per sample), params_after, accuracy (without fine-tuning), reconstructed_accuracy (the same
    pruning with ``reconstruct=``, without fine-tuning; empty when not measured), score_seconds.

    Example:
        >>> # write_table(result, "out/compare.md", fmt="md")
    """
    _write(_COLUMNS, _table_rows(result), path, fmt)


def write_layer_table(result: CompareResult, path: str | os.PathLike, fmt: str = "csv") -> None:
    """Per layer (group root, in model order): its channels and the fraction each method keeps at
    ``result.profile_ratio``.

    Example:
        >>> # write_layer_table(result, "out/layer_profile.csv")
    """
    methods = list(result.kept)
    rows = [[layer, str(n)] + [f"{result.kept[m][i] / max(1, n):.3f}" for m in methods]
            for i, (layer, n) in enumerate(zip(result.layers, result.layer_sizes))]
    _write(["layer", "channels"] + methods, rows, path, fmt)


def require_matplotlib():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or :class:`PlotUnavailable`.

    Example:
        >>> # plt = require_matplotlib()
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable("plots need matplotlib: pip install matplotlib (or pip install 'pyobc[plot]')") \
            from exc
    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend probing
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(result: CompareResult, path: str | os.PathLike) -> None:
    """Accuracy without fine-tuning against the fraction of MACs removed, one line per method (PNG).

    Example:
        >>> # plot_accuracy(result, "out/accuracy_vs_macs.png")
    """
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        for method in dict.fromkeys(r.method for r in result.rows):
            pts = sorted((r.macs_removed, r.accuracy) for r in result.rows if r.method == method)
            xs = [0.0] + [p[0] for p in pts]
            ys = [result.baseline_accuracy] + [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", label=method)
        ax.axhline(result.baseline_accuracy, color="grey", linestyle="--", linewidth=0.8, label="unpruned")
        ax.set_xlabel("fraction of MACs removed")
        ax.set_ylabel("accuracy (no fine-tuning)")
        ax.set_ylim(0.0, 1.02)
        ax.set_title(("Accuracy after pruning" + (f": {result.title}" if result.title else "")))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def plot_layer_profile(result: CompareResult, path: str | os.PathLike) -> None:
    """Fraction of each layer's channels kept by every method at ``result.profile_ratio`` (PNG); the
    layers a method keeps widest are the ones it finds hardest to thin.

    Example:
        >>> # plot_layer_profile(result, "out/layer_profile.png")
    """
    plt = require_matplotlib()
    n = len(result.layers)
    fig, ax = plt.subplots(figsize=(max(7.0, min(0.28 * n + 2, 24.0)), 4.8), dpi=100)
    try:
        xs = list(range(n))
        for method in result.kept:
            ax.plot(xs, result.kept_fraction(method), marker="o", markersize=3, label=method)
        step = max(1, n // 40)  # at most ~40 labels stay readable
        ax.set_xticks(xs[::step])
        ax.set_xticklabels(result.layers[::step], rotation=90, fontsize="x-small")
        ax.set_ylim(0.0, 1.05)
        ax.set_ylabel("fraction of channels kept")
        ax.set_title(f"Kept channels per layer at {result.profile_ratio:g} of MACs removed"
                     + (f": {result.title}" if result.title else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
