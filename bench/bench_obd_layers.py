"""OBD's squared per-sample gradient sums of one 3x3 conv, by each path, side by side.

For each layer shape: the per-sample path (grouped weight-gradient convolutions over chunks of samples,
``ops.reference.sq_chunk_samples``), the pair-of-positions path (``position_pairs``), both through
``per_sample.sq_grad_sums`` with the pair threshold forced, and, for scale, one batched weight gradient. Medians over ``--repeats`` alternating rounds; the two paths' results are
checked against each other. Which path ``sq_grad_sums`` takes is marked with ``*``.

    python bench/bench_obd_layers.py                 # the shapes of bench/RESULTS.md
    python bench/bench_obd_layers.py --batch 64 --repeats 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from pyobc.scoring import per_sample
from pyobc.scoring.capture import Record

#: (channels, output height, output width)
SHAPES = [(512, 1, 1), (256, 2, 2), (256, 3, 3), (128, 4, 4), (64, 3, 3), (16, 3, 3), (64, 8, 8)]


def _sq_sums(conv: nn.Conv2d, calls: list, pairs_up_to: int) -> torch.Tensor:
    """``per_sample.sq_grad_sums`` with the pair path allowed up to ``pairs_up_to`` positions."""
    saved = per_sample.PAIR_POSITIONS, per_sample.PAIR_POSITIONS_WHEN_ONE_SAMPLE
    per_sample.PAIR_POSITIONS = per_sample.PAIR_POSITIONS_WHEN_ONE_SAMPLE = pairs_up_to
    try:
        return per_sample.sq_grad_sums(conv, calls, 1.0, {"weight"})["weight"]
    finally:
        per_sample.PAIR_POSITIONS, per_sample.PAIR_POSITIONS_WHEN_ONE_SAMPLE = saved


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}; medians in ms")
    for c, h, w in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        x = torch.randn(args.batch, c, h, w)
        g = torch.randn(args.batch, c, h, w)
        calls = [(Record((x,), {}, g, ()), [g])]
        paths = {
            "per-sample": lambda: _sq_sums(conv, calls, 0),
            "pairs": lambda: _sq_sums(conv, calls, h * w),
            "batched": lambda: torch.nn.grad.conv2d_weight(x, conv.weight.shape, g, 1, 1),
        }
        a, b = paths["per-sample"](), paths["pairs"]()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
        times = {k: [] for k in paths}
        for _ in range(args.repeats):
            for k, fn in paths.items():
                times[k].append(_seconds(fn))
        chosen = "pairs" if per_sample._pair_sums(conv, calls, {"weight"}) is not None else "per-sample"
        cells = "  ".join(f"{k}{'*' if k == chosen else ' '} {statistics.median(v) * 1e3:8.2f}"
                          for k, v in times.items())
        print(f"{c:4d} channels, {h}x{w} positions   {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
