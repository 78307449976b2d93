"""Benchmarks of the pyobc channel reductions against the eager PyTorch expressions they replace.

    pytest bench/bench_ops.py --benchmark-only      # pytest-benchmark, op and eager side by side
    python bench/bench_ops.py [--threads N] [--reps R]   # table: medians, eager/op ratios

The eager expressions materialise ``a * b`` (a full-size temporary) and then reduce it; the ops
read both inputs once. Both are timed in the same process, interleaved, so machine noise hits
both alike; on a shared 2-core machine, read the ratios rather than the absolute times.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyobc.ops as ops


def _act(shape, layout="contiguous"):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen)
    b = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    return a, b


def _eager_weight_sums(w, t, groups):
    p = w * t
    out_ch, in_pg = w.shape[:2]
    out_sums = p.sum(tuple(range(1, w.dim())))
    in_sums = p.reshape(groups, out_ch // groups, in_pg, -1).sum((1, 3)).reshape(-1)
    return out_sums, in_sums


def cases():
    """name -> builder of (inputs, op, eager); lazy, so that pytest collection stays cheap."""
    def act(shape, dim, per_sample, layout="contiguous"):
        def build():
            a, b = _act(shape, layout)
            keep = {dim % len(shape), 0} if per_sample else {dim % len(shape)}
            dims = tuple(d for d in range(len(shape)) if d not in keep)
            return ((a, b),
                    lambda a, b: ops.channel_dot(a, b, dim, per_sample),
                    lambda a, b: (a * b).sum(dims))
        return build

    def weights(shape, groups):
        def build():
            w, t = _act(shape)
            return ((w, t),
                    lambda w, t: ops.weight_channel_sums(w, t, groups),
                    lambda w, t: _eager_weight_sums(w, t, groups))
        return build

    return {
        "act 64x64x32x32 dim=1": act((64, 64, 32, 32), 1, False),
        "act 64x64x32x32 dim=1 per_sample": act((64, 64, 32, 32), 1, True),
        "act 64x64x32x32 channels_last per_sample": act((64, 64, 32, 32), 1, True, "channels_last"),
        "tokens 64x197x192 dim=-1": act((64, 197, 192), -1, False),
        "tokens 64x197x192 dim=-1 per_sample": act((64, 197, 192), -1, True),
        "weight 512x256x3x3 groups=1": weights((512, 256, 3, 3), 1),
        "weight 512x256x3x3 groups=4": weights((512, 256, 3, 3), 4),
        "weight 512x1x3x3 depthwise": weights((512, 1, 3, 3), 512),
    }


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("impl", ["op", "eager"])
    @pytest.mark.parametrize("case", list(cases()))
    def test_bench(benchmark, case, impl):
        inputs, op, eager = cases()[case]()
        fn = op if impl == "op" else eager
        benchmark.group = case
        benchmark.extra_info["threads"] = torch.get_num_threads()
        benchmark(fn, *inputs)


# ----------------------------------------------------------------------------------------------
# script mode
# ----------------------------------------------------------------------------------------------

def _time(fn, inputs, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn(*inputs)
    return (time.perf_counter() - start) / calls


def run(reps: int = 15, min_time: float = 0.05) -> list[tuple[str, float, float]]:
    rows = []
    for name, build in cases().items():
        inputs, op, eager = build()
        # check before timing: same numbers
        for x, y in zip(torch.utils._pytree.tree_leaves(op(*inputs)),
                        torch.utils._pytree.tree_leaves(eager(*inputs))):
            torch.testing.assert_close(x, y.to(x.dtype), rtol=1e-3, atol=1e-2)
        calls = max(1, int(min_time / max(_time(op, inputs, 1), _time(eager, inputs, 1), 1e-6)))
        t_op, t_eager = [], []
        for _ in range(reps):  # interleaved
            t_op.append(_time(op, inputs, calls))
            t_eager.append(_time(eager, inputs, calls))
        rows.append((name, statistics.median(t_eager), statistics.median(t_op)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = ops.backend_report()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, pyobc ops: "
          f"{report['extension']['status']} (cpu: {report['ops']['channel_dot']['cpu']})")
    print(f"{'case':44s} {'eager ms':>9s} {'op ms':>9s} {'eager/op':>9s}")
    for name, t_eager, t_op in run(args.reps):
        print(f"{name:44s} {t_eager * 1e3:9.2f} {t_op * 1e3:9.2f} {t_eager / t_op:9.2f}")


if __name__ == "__main__":
    main()
