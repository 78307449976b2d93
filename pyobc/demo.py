"""``pyobc demo``: the built-in default job, end to end on real data.

Takes ResNet-20 trained on the UCI digits (trained once, then cached), scores it with every criterion
(the evaluation-only ``oracle`` is left out unless asked for), physically removes channels until half of
the MACs are gone (:func:`pyobc.prune` with ``target="macs"``; global scope, except ``magnitude`` whose
scores are not comparable across layers and which therefore prunes every group alike), evaluates the pruned
model, fine-tunes it briefly and evaluates it again. With ``reconstruct`` (the default) it also prunes the same
way with ``reconstruct=`` (:mod:`pyobc.pruning.reconstruct`: the layers that lost inputs refit by least squares
on the scoring batches) and evaluates that without fine-tuning. For ``jacobian`` (Optimal Brain Connection) it adds an
Equivalent Pruning row: the same channels removed through trainable adapters
(:func:`pyobc.equivalent_prune`), fine-tuned with the adapters in their own parameter group, then folded
(:func:`pyobc.fold`) into a plain model of the same size.

One table: method, scoring time and its ratio to one forward+backward per batch, parameters and MACs
after pruning, accuracy after pruning, after pruning with reconstruction, and after fine-tuning.
``quick=True`` (``pyobc demo --quick``) uses 8x8 images, a 3-epoch model, 2 scoring batches and one
fine-tuning epoch: well under a minute on 2 CPU cores, training included. Both presets run torch on one thread unless told otherwise (see
:class:`DemoSettings`).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Sequence, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import pyobc

from . import datasets, models
from .criteria import get_method

__all__ = ["DemoRow", "DemoSettings", "run_demo", "format_table", "forward_backward_seconds", "default_methods",
           "fine_tune"]


@dataclasses.dataclass
class DemoRow:
    """One line of the demo table."""

    method: str
    seconds: float | None  #: scoring wall time (None for the Equivalent Pruning row: it reuses jacobian's)
    per_batch_ratio: float | None  #: scoring time per batch / one forward+backward
    accuracy: float  #: test accuracy after pruning, before fine-tuning
    params_after: int = 0
    macs_after: int = 0
    finetuned_accuracy: float | None = None
    scope: str = "global"
    #: test accuracy after pruning with ``reconstruct=`` (no fine-tuning); None when not measured
    reconstructed_accuracy: float | None = None

    def to_dict(self) -> dict:
        """The row as a plain dict (for JSON).

        Example:
            >>> DemoRow("taylor", 1.0, 2.0, 0.5).to_dict()["method"]
            'taylor'
        """
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run; :meth:`quick` and :meth:`full` are the two presets.

    Example:
        >>> DemoSettings.quick().image_size, DemoSettings.full().image_size
        (8, 16)
    """

    image_size: int = 16
    train_epochs: int | None = None  #: None: the zoo recipe (15 epochs)
    batches: int = 8
    batch_size: int = 64
    finetune_epochs: int = 3
    finetune_lr: float = 0.05
    #: torch intra-op threads for the run (None: leave torch's setting). 1 by default: ResNet-20 on digits gains
    #: little from a second thread, while on a 2-core CPU shared with busy processes two threads that wait for
    #: each other were measured up to 25x slower than one (ec scoring: 135 s against 5.5 s).
    threads: int | None = 1

    @classmethod
    def quick(cls) -> "DemoSettings":
        """8x8 images, a 3-epoch model, 2 scoring batches, 1 fine-tuning epoch (``pyobc demo --quick``).

        Example:
            >>> DemoSettings.quick().batches
            2
        """
        return cls(image_size=8, train_epochs=3, batches=2, finetune_epochs=1, finetune_lr=0.1)

    @classmethod
    def full(cls) -> "DemoSettings":
        """16x16 images, the zoo's 15-epoch model, 8 scoring batches, 3 fine-tuning epochs (``pyobc demo``).

        Example:
            >>> DemoSettings.full().finetune_epochs
            3
        """
        return cls()


def default_methods() -> list[str]:
    """Every criterion that estimates importance (the measuring ``oracle`` is left out).

    Example:
        >>> "oracle" in default_methods(), "jacobian" in default_methods()
        (False, True)
    """
    return [m for m in pyobc.methods() if not get_method(m).evaluation_only]


def forward_backward_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of one forward+backward of ``model`` on ``(x, y)`` (its grads are restored).

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> forward_backward_seconds(net, torch.randn(8, 4), torch.zeros(8, dtype=torch.long)) > 0
        True
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    times = []
    try:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            torch.autograd.grad(loss, params)
            times.append(time.perf_counter() - t0)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return statistics.median(times[1:])  # the first run pays for allocations


def fine_tune(model: nn.Module, loader, epochs: int, lr: float, *, weight_decay: float = 5e-4,
              adapters: Sequence[nn.Parameter] = (), progress: bool | None = None) -> nn.Module:
    """Train ``model`` in place (SGD, Nesterov momentum, cosine schedule); ``adapters`` (Equivalent
    Pruning's C and D maps) get their own parameter group without weight decay, as in the OBC paper.

    Example:
        >>> # fine_tune(pruned, pyobc.datasets.digits("train", image_size=16), epochs=3, lr=0.05)
    """
    if epochs <= 0:
        return model
    ids = {id(p) for p in adapters}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": [p for p in base if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in base if p.ndim < 2], "weight_decay": 0.0}]
    if adapters:
        # selection matrices at the start: decay would pull them towards zero, away from the kept channels
        groups.append({"params": list(adapters), "weight_decay": 0.0})
    models.train(model, loader, epochs, lr, weight_decay=weight_decay,
                 param_groups=[g for g in groups if g["params"]], progress=progress)
    return model


def _fmt_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_table(rows: Sequence[DemoRow], baseline: float, params_before: int | None = None,
                 macs_before: int | None = None) -> str:
    """The demo table as text (an ``(unpruned)`` line first).

    Example:
        >>> table = format_table([DemoRow("taylor", 1.5, 3.0, 0.5, 1000, 2000, 0.9, reconstructed_accuracy=0.95)],
        ...                      0.99, 2000, 4000)
        >>> table.splitlines()[2].split(), table.splitlines()[3].split()
        (['(unpruned)', '2k', '4k', '99.00%'], ['taylor', '1.50', '3.00', '1k', '2k', '50.00%', '95.00%', '90.00%'])
    """
    head = (f"{'method':<14}{'score time (s)':>15}{'x fwd+bwd / batch':>19}{'params after':>14}"
            f"{'MACs after':>12}{'acc pruned':>12}{'acc pruned + reconstructed':>28}{'acc fine-tuned':>16}")
    lines = [head, "-" * len(head)]
    lines.append(f"{'(unpruned)':<14}{'':>15}{'':>19}"
                 f"{_fmt_count(params_before) if params_before else '':>14}"
                 f"{_fmt_count(macs_before) if macs_before else '':>12}{baseline:>12.2%}{'':>28}{'':>16}")
    for r in rows:
        secs = "-" if r.seconds is None else f"{r.seconds:.2f}"
        ratio = "-" if r.per_batch_ratio is None else f"{r.per_batch_ratio:.2f}"
        ft = "-" if r.finetuned_accuracy is None else f"{r.finetuned_accuracy:.2%}"
        rec = "-" if r.reconstructed_accuracy is None else f"{r.reconstructed_accuracy:.2%}"
        lines.append(f"{r.method:<14}{secs:>15}{ratio:>19}{_fmt_count(r.params_after):>14}"
                     f"{_fmt_count(r.macs_after):>12}{r.accuracy:>12.2%}{rec:>28}{ft:>16}")
    return "\n".join(lines)


def run_demo(methods: Sequence[str] | None = None, *, ratio: float = 0.5, batches: int | None = None,
             batch_size: int = 64, image_size: int | None = None, out: TextIO = sys.stdout,
             progress: bool | None = None, quick: bool = False, finetune_epochs: int | None = None,
             equivalent: bool = True, settings: DemoSettings | None = None,
             threads: int | None = None, reconstruct: bool = True) -> list[DemoRow]:
    """Run the demo and print its table to ``out``; returns the rows.

    Args:
        methods: criteria to run (default: :func:`default_methods`).
        ratio: fraction of the MACs to remove (0.5).
        batches, batch_size, image_size, finetune_epochs, threads: override the preset's values (``threads``:
            torch intra-op threads for the run, restored afterwards).
        quick: the small preset (:meth:`DemoSettings.quick`) instead of the full one.
        equivalent: add the Equivalent Pruning row when ``jacobian`` (or ``obc``) is among the methods.
        reconstruct: also measure the accuracy after pruning with ``reconstruct=`` (calibration: the scoring
            batches), the column "acc pruned + reconstructed".
        progress: tqdm bars on stderr (None: when stderr is a terminal).

    Example:
        >>> from pyobc.demo import run_demo
        >>> rows = run_demo(["magnitude"], quick=True)   # doctest: +SKIP
        >>> rows[0].macs_after                            # doctest: +SKIP
    """
    base = settings or (DemoSettings.quick() if quick else DemoSettings.full())
    st = dataclasses.replace(
        base, batch_size=batch_size,
        **{k: v for k, v in (("batches", batches), ("image_size", image_size),
                             ("finetune_epochs", finetune_epochs), ("threads", threads)) if v is not None})
    methods = list(methods) if methods else default_methods()
    before = torch.get_num_threads()
    if st.threads is not None:
        torch.set_num_threads(st.threads)
    try:
        return _run(methods, ratio, st, quick, equivalent, out, progress, reconstruct)
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class _DemoJob:
    """What every method's rows are measured on: the trained model, the data, the settings."""

    model: nn.Module
    score_data: DataLoader  #: the train split in a fixed order: every method scores the same batches
    test: DataLoader
    example: torch.Tensor  #: two samples, to trace the model and count MACs with
    ratio: float
    settings: DemoSettings
    progress: bool | None
    out: TextIO
    reconstruct: bool = True

    def tune_data(self) -> DataLoader:
        """Fine-tuning batches: the same order for every method, so the fine-tuned rows compare like for like."""
        st = self.settings
        return datasets.digits("train", batch_size=st.batch_size, image_size=st.image_size, channels=1, seed=1)

    def tune(self, model: nn.Module, adapters: Sequence[nn.Parameter] = ()) -> None:
        """:func:`fine_tune` with the settings' epochs and learning rate."""
        st = self.settings
        fine_tune(model, self.tune_data(), st.finetune_epochs, st.finetune_lr, adapters=adapters,
                  progress=self.progress)

    def tuned_accuracy(self, model: nn.Module) -> float | None:
        """Test accuracy after fine-tuning (None when the settings fine-tune for no epoch)."""
        return models.evaluate(model, self.test) if self.settings.finetune_epochs > 0 else None

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def _run(methods, ratio: float, st: DemoSettings, quick: bool, equivalent: bool, out: TextIO,
         progress: bool | None, reconstruct: bool = True) -> list[DemoRow]:
    size = st.image_size
    print(f"pyobc {pyobc.__version__} demo{' (quick)' if quick else ''}: ResNet-20 on UCI digits ({size}x{size}), "
          f"removing {ratio:.0%} of the MACs, then {st.finetune_epochs} epoch(s) of fine-tuning", file=out, flush=True)
    model = models.trained("resnet20", image_size=size, channels=1, epochs=st.train_epochs, progress=progress)
    info = models.trained_info(model)
    print(f"model: {'cached' if info.from_cache else f'trained now in {info.train_seconds:.1f} s'} "
          f"({info.path}), test accuracy {info.test_accuracy:.2%}", file=out, flush=True)
    score_data = datasets.digits("train", batch_size=st.batch_size, image_size=size, channels=1, shuffle=False)
    test = datasets.digits("test", batch_size=256, image_size=size, channels=1)
    x, y = next(iter(score_data))
    job = _DemoJob(model, score_data, test, x[:2], ratio, st, progress, out, reconstruct)
    fb = forward_backward_seconds(model.eval(), x, y)
    baseline = models.evaluate(model, test)
    params_before, macs_before = pyobc.count(model, job.example)
    rows: list[DemoRow] = []
    for method in methods:
        rows += _method_rows(job, method, fb, equivalent)
    print(file=out)
    print(format_table(rows, baseline, params_before, macs_before), file=out)
    print(f"\nparams and MACs per sample after pruning; one forward+backward (batch {st.batch_size}): "
          f"{fb * 1000:.1f} ms; scoring used {st.batches} batch(es) and its time includes tracing the model's "
          f"coupled layers; fine-tuning: {st.finetune_epochs} epoch(s) on the train split, lr {st.finetune_lr:g}. "
          f"+EP: the jacobian scores, pruned through Equivalent Pruning adapters, fine-tuned, then folded. "
          f"Reconstructed: the layers that lost inputs refit by least squares on the {st.batches} scoring batch(es), "
          f"no fine-tuning.",
          file=out)
    return rows


def _method_rows(job: _DemoJob, method: str, fb_seconds: float, equivalent: bool) -> list[DemoRow]:
    """Score with ``method``, prune, evaluate, fine-tune, evaluate again: its row, and for jacobian the
    Equivalent Pruning row too when ``equivalent``."""
    name = get_method(method).name
    scope = "local" if name == "magnitude" else "global"
    t0 = time.perf_counter()
    scores = pyobc.score(job.model, job.score_data, method, max_batches=job.settings.batches, progress=job.progress)
    seconds = time.perf_counter() - t0
    pruned, report = pyobc.prune(job.model, scores, job.ratio, scope=scope, target="macs", example_inputs=job.example)
    acc = models.evaluate(pruned, job.test)
    rec = _reconstructed_accuracy(job, scores, scope)
    job.tune(pruned)
    tuned = job.tuned_accuracy(pruned)
    # a data-free criterion (magnitude) runs no batch: no per-batch ratio
    per_batch = seconds / scores.batches / fb_seconds if scores.batches else None
    rows = [DemoRow(method, seconds, per_batch, acc, report.params_after, int(report.macs_after or 0), tuned, scope,
                    rec)]
    job.say(f"  {method}: scored in {seconds:.2f} s; accuracy {acc:.2%} pruned"
            + (f", {rec:.2%} pruned + reconstructed" if rec is not None else "")
            + (f", {tuned:.2%} fine-tuned" if tuned is not None else ""))
    if equivalent and name == "jacobian":
        rows.append(_equivalent_row(job, method, scores, scope))
    return rows


def _reconstructed_accuracy(job: _DemoJob, scores: pyobc.Scores, scope: str) -> float | None:
    """Test accuracy of the same pruning with ``reconstruct=`` the scoring batches (None when not asked for)."""
    if not job.reconstruct:
        return None
    rebuilt, _ = pyobc.prune(job.model, scores, job.ratio, scope=scope, target="macs", example_inputs=job.example,
                             reconstruct=job.score_data, reconstruct_batches=job.settings.batches,
                             progress=job.progress)
    return models.evaluate(rebuilt, job.test)


def _equivalent_row(job: _DemoJob, method: str, scores: pyobc.Scores, scope: str) -> DemoRow:
    """The same channels removed through Equivalent Pruning adapters, fine-tuned, then folded."""
    adapted = pyobc.equivalent_prune(job.model, scores, job.ratio, scope=scope, target="macs",
                                     example_inputs=job.example)
    acc = models.evaluate(adapted, job.test)  # equals the naive row: the adapters start as selections
    job.tune(adapted, adapters=pyobc.adapter_parameters(adapted))
    plain = pyobc.fold(adapted)
    tuned = job.tuned_accuracy(plain)
    params, macs = pyobc.count(plain, job.example)
    job.say(f"  {method}+EP (Equivalent Pruning): accuracy {acc:.2%} pruned"
            + (f", {tuned:.2%} fine-tuned and folded" if tuned is not None else ""))
    return DemoRow(f"{method}+EP", None, None, acc, params, int(macs or 0), tuned, scope)
