"""``pyobc bench``: each compiled op of :mod:`pyobc.ops` timed against its pure-PyTorch reference kernel.

Both sides run in the same process on the same inputs, interleaved (compiled, reference, compiled, ...),
so load from other processes hits both alike; the table reports medians and the ratio
reference / compiled (above 1: the compiled kernel is faster). The fuller benchmarks (eager expressions,
Layout, bandwidth on GPUs) are in the source tree's ``bench/``, which is not installed.

Example:
    >>> from pyobc.microbench import run_bench, format_bench
    >>> results = run_bench(quick=True, repeats=1)       # doctest: +SKIP
    >>> print(format_bench(results))                     # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from . import ops
from .ops import reference
from .progress import progress_bar, show_progress

__all__ = ["BenchResult", "run_bench", "format_bench", "extension_status"]


@dataclasses.dataclass
class BenchResult:
    """One case: median seconds of the compiled op and of its reference kernel."""

    case: str
    op: str
    device: str
    compiled_s: float
    reference_s: float

    @property
    def ratio(self) -> float:
        """reference / compiled: how many times faster the compiled kernel is.

        Example:
            >>> from pyobc.microbench import BenchResult
            >>> BenchResult("small", "channel_dot", "cpu", 0.001, 0.003).ratio
            3.0
        """
        return self.reference_s / self.compiled_s if self.compiled_s > 0 else float("inf")

    def to_dict(self) -> dict:
        """The result and its ratio as a plain dict (for JSON).

        Example:
            >>> from pyobc.microbench import BenchResult
            >>> sorted(BenchResult("small", "channel_dot", "cpu", 0.001, 0.003).to_dict())[:3]
            ['case', 'compiled_s', 'device']
        """
        return {**dataclasses.asdict(self), "ratio": self.ratio}


def extension_status(device: str = "cpu") -> tuple[bool, str]:
    """``(compiled kernels serve device, explanation)``.

    Example:
        >>> from pyobc.microbench import extension_status
        >>> ok, why = extension_status("cpu")
        >>> isinstance(ok, bool) and isinstance(why, str)
        True
    """
    report = ops.backend_report()
    ext = report["extension"]
    served = {name: info.get(device) for name, info in report["ops"].items()}
    if ext.get("status") != "loaded":
        reason = ext.get("error") or ext.get("status")
        return False, f"the compiled extension is not loaded ({reason}); every op runs its reference kernel"
    if not any(v == "compiled" for v in served.values()):
        return False, f"the compiled extension has no {device} kernels (a build without them)"
    return True, f"compiled extension {ext.get('path')}"


def _scale_case(randn: Callable, shape: tuple) -> tuple[Callable, Callable]:
    """channel_scale on activations: the compiled op against the reference kernel."""
    x, s = randn(*shape), randn(shape[1])
    return (lambda: ops.channel_scale(x, s, 1), lambda: reference.channel_scale(x, s, 1))


def _sq_sums_case(randn: Callable, n: int, c: int) -> tuple[Callable, Callable]:
    """conv2d_sq_grad_sums of a 3x3 conv on 8x8 maps: the compiled op against the reference kernel."""
    x, g = randn(n, c, 8, 8), randn(n, c, 8, 8)
    conv = ((3, 3), (1, 1), (1, 1), (1, 1))
    return (lambda: ops.conv2d_sq_grad_sums(x, g, *conv), lambda: reference.conv2d_sq_grad_sums(x, g, *conv))


def _cases(quick: bool, device: str) -> list[tuple[str, str, Callable[[], tuple]]]:
    """(case, op, build) with build() -> (compiled_fn, reference_fn); inputs are made on demand."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    # quick: sizes that take well under a millisecond, so the whole run is a few seconds on 2 cores
    n, c, hw = (8, 32, 8) if quick else (64, 64, 32)
    t, e = (16, 64) if quick else (197, 192)
    o, i = (64, 32) if quick else (512, 256)
    rows, src, dst = (16, 4096, 1024) if quick else (256, 65536, 16384)

    def act(per_sample):
        a, b = randn(n, c, hw, hw), randn(n, c, hw, hw)
        return (lambda: ops.channel_dot(a, b, 1, per_sample), lambda: reference.channel_dot(a, b, 1, per_sample))

    def tokens():
        a, b = randn(n, t, e), randn(n, t, e)
        return (lambda: ops.channel_dot(a, b, -1), lambda: reference.channel_dot(a, b, -1))

    def weights():
        w, g = randn(o, i, 3, 3), randn(o, i, 3, 3)
        return (lambda: ops.weight_channel_sums(w, g, 1), lambda: reference.weight_channel_sums(w, g, 1))

    def csr(reduce=None):
        values = randn(rows, src)
        counts = torch.randint(1, 5, (dst,), generator=gen)
        rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
        col = torch.randint(0, src, (int(counts.sum()),), generator=gen).to(device)
        if reduce is None:
            return (lambda: ops.csr_gather_sum(values, rowptr, col, check=False),
                    lambda: reference.csr_gather_sum(values, rowptr, col))
        return (lambda: ops.csr_gather_reduce(values, rowptr, col, reduce, check=False),
                lambda: reference.csr_gather_reduce(values, rowptr, col, reduce))

    def gather():
        # every weight and bias of a small ResNet, half of the out-channels kept (what pruning does)
        widths = [16] * 7 + [32] * 6 + [64] * 6
        if not quick:
            widths = widths * 3
        tensors, dims, idx = [], [], []
        for w in widths:
            for shape in ((w, w, 3, 3), (w,)):
                tensors.append(randn(*shape))
                dims.append(0)
                idx.append(torch.randperm(w, generator=gen)[: w // 2].sort().values.to(device))
        return (lambda: ops.gather_channels(tensors, dims, idx), lambda: reference.gather_channels(tensors, dims, idx))

    return [
        (f"activations {n}x{c}x{hw}x{hw}", "channel_dot", lambda: act(False)),
        (f"activations {n}x{c}x{hw}x{hw} per sample", "channel_dot", lambda: act(True)),
        (f"tokens {n}x{t}x{e}", "channel_dot", tokens),
        (f"activations {n}x{c}x{hw}x{hw}", "channel_scale", lambda: _scale_case(randn, (n, c, hw, hw))),
        (f"weight {o}x{i}x3x3", "weight_channel_sums", weights),
        (f"{rows} rows, {src} -> {dst}", "csr_gather_sum", csr),
        (f"{rows} rows, {src} -> {dst}, amax", "csr_gather_reduce", lambda: csr("amax")),
        ("resnet-sized weights, keep 1/2", "gather_channels", gather),
        (f"conv 3x3 {n}x{c}x8x8", "conv2d_sq_grad_sums", lambda: _sq_sums_case(randn, n, c)),
    ]


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run_bench(quick: bool = False, device: str = "cpu", repeats: int | None = None,
              progress: bool | None = None, only: str | None = None) -> list[BenchResult]:
    """Time every op (or those whose case or op name contains ``only``) on ``device``.

    Returns an empty list when no compiled kernel serves ``device`` (see :func:`extension_status`).

    Example:
        >>> rs = run_bench(quick=True, repeats=1, only="gather_channels")   # doctest: +SKIP
        >>> rs[0].ratio > 0                                                  # doctest: +SKIP
        True
    """
    dev = torch.device(device)
    ok, _ = extension_status(dev.type)
    if not ok:
        return []
    repeats = repeats if repeats is not None else (5 if quick else 15)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    cases = [cs for cs in _cases(quick, device) if only is None or only in cs[0] or only in cs[1]]
    results = []
    with torch.no_grad():
        for case, op, build in progress_bar(cases, show_progress(progress), desc="pyobc bench", unit="op"):
            compiled, reference = build()
            compiled(), reference()  # warm-up: allocator, first-call dispatch, lazy kernels
            ct, rt = [], []
            for _ in range(repeats):  # interleaved, so a burst of load hits both sides
                ct.append(_timed(compiled, sync))
                rt.append(_timed(reference, sync))
            results.append(BenchResult(case, op, dev.type, statistics.median(ct), statistics.median(rt)))
    return results


def format_bench(results: list[BenchResult]) -> str:
    """A text table: case, op, both medians and the ratio.

    Example:
        >>> from pyobc.microbench import BenchResult, format_bench
        >>> format_bench([BenchResult("small", "channel_dot", "cpu", 0.001, 0.003)]).splitlines()[-1].split()
        ['channel_dot', 'small', '1.000', '3.000', '3.00x']
    """
    head = f"{'op':<21}{'case':<40}{'compiled (ms)':>15}{'reference (ms)':>17}{'reference / compiled':>23}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.op:<21}{r.case:<40}{r.compiled_s * 1e3:>15.3f}{r.reference_s * 1e3:>17.3f}"
                     f"{r.ratio:>22.2f}x")
    return "\n".join(lines)
