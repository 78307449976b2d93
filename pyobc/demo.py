"""``pyobc demo``: the built-in default job, end to end on real data.

Takes ResNet-20 trained on the UCI digits (cached after the first run), scores it with every
criterion, zeroes the lowest-scored half of the channels of every scored group, and reports for each
criterion the scoring time, that time relative to one forward+backward pass, and the test accuracy.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Sequence, TextIO

import torch
import torch.nn.functional as F

__all__ = ["DemoRow", "run_demo", "format_table", "forward_backward_seconds"]


@dataclasses.dataclass
class DemoRow:
    method: str
    seconds: float
    per_batch_ratio: float  # scoring time per batch / one forward+backward
    accuracy: float  # test accuracy after zeroing


def forward_backward_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of one forward+backward of ``model`` on ``(x, y)`` (its grads are restored)."""
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
    return statistics.median(times[1:])


def format_table(rows: Sequence[DemoRow], baseline: float) -> str:
    head = f"{'method':<12}{'score time (s)':>16}{'x fwd+bwd / batch':>20}{'test acc':>10}"
    lines = [head, "-" * len(head)]
    lines.append(f"{'(unpruned)':<12}{'':>16}{'':>20}{baseline:>10.2%}")
    for r in rows:
        lines.append(f"{r.method:<12}{r.seconds:>16.2f}{r.per_batch_ratio:>20.2f}{r.accuracy:>10.2%}")
    return "\n".join(lines)


def run_demo(methods: Sequence[str] | None = None, *, ratio: float = 0.5, batches: int = 8, batch_size: int = 64,
             image_size: int = 16, out: TextIO = sys.stdout, progress: bool | None = None) -> list[DemoRow]:
    """Run the demo and print its table to ``out``; returns the rows.

    Example:
        >>> from pyobc.demo import run_demo
        >>> rows = run_demo(["magnitude"], batches=1)   # doctest: +SKIP
    """
    import pyobc
    from pyobc import datasets, models
    from pyobc.masking import lowest_channels, zero_channels

    from pyobc.criteria import get_method

    # every estimating criterion; the oracle measures (one pass per channel) and is left out
    methods = list(methods) if methods else [m for m in pyobc.methods() if not get_method(m).evaluation_only]
    print(f"pyobc {pyobc.__version__} demo: ResNet-20 on UCI digits ({image_size}x{image_size}), "
          f"zeroing the lowest-scored {ratio:.0%} of each group's channels", file=out)
    model = models.trained("resnet20", image_size=image_size, channels=1, progress=progress)
    info = models.trained_info(model)
    print(f"model: {'cached' if info.from_cache else 'trained now'} ({info.path}), "
          f"test accuracy {info.test_accuracy:.2%}", file=out)
    train = datasets.digits("train", batch_size=batch_size, image_size=image_size, channels=1, shuffle=False)
    test = datasets.digits("test", batch_size=256, image_size=image_size, channels=1)
    x, y = next(iter(train))
    fb = forward_backward_seconds(model.eval(), x, y)
    baseline = models.evaluate(model, test)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        scores = pyobc.score(model, train, method, max_batches=batches, progress=progress)
        seconds = time.perf_counter() - t0
        pruned = zero_channels(model, scores.groups, lowest_channels(scores.values, scores.groups, ratio))
        acc = models.evaluate(pruned, test)
        used = max(scores.batches, 1)
        rows.append(DemoRow(method, seconds, seconds / used / fb, acc))
        print(f"  {method}: {seconds:.2f} s, accuracy after zeroing {acc:.2%}", file=out)
    print(file=out)
    print(format_table(rows, baseline), file=out)
    print(f"\none forward+backward (batch {batch_size}): {fb * 1000:.1f} ms; scoring used {batches} batches; "
          "times include tracing the model's coupled layers", file=out)
    return rows
