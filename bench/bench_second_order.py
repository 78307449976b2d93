"""What the lean second-order kernels (``pyobc.ops.second_order``) buy, measured side by side.

    OMP_NUM_THREADS=1 python bench/bench_second_order.py                       # ResNet-20/56, oba/oba full/sosp-h
    OMP_NUM_THREADS=1 python bench/bench_second_order.py --models mobilenet_v2 efficientnet_b0 resnet18 \\
        --methods oba --size 64 --batch 32                                     # torchvision (random init)

For each model and criterion, interleaved in one process (machine drift hits every variant alike):
the median time of one scoring batch ÷ one forward+backward, with

* ``native``: torch's own convolution and batch-norm autograd in the second-order passes (what pyobc
  did before: the double backward of a convolution also computes its unused weight term, per group
  for grouped/depthwise convolutions);
* ``lean``: pyobc's default (``second_order_mode`` routes ``F.conv*d`` through ``conv_input_only``,
  eval-mode ``F.batch_norm`` through ``batch_norm_eval`` and, under forward-mode AD, ``F.relu`` through
  ``relu_on_dual``);

torchvision's CUDA wheels fail to import on CPU-only torch ("operator torchvision::nms does not
exist"); this script stubs ``torchvision._meta_registrations`` before importing it (bench only).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import types

import torch

import pyobc
import pyobc.scoring.gates as gates
from pyobc.ops.second_order import OVERRIDES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scoring import build, paired_times  # noqa: E402

METHODS = {"oba": ("oba", {}), "oba-full": ("oba", {"hessian": "full"}), "sosp-h": ("sosp-h", {})}
CIFAR = ("resnet20", "resnet56", "vit_tiny")


@contextlib.contextmanager
def variant(name: str):
    """Installs one variant for the duration of the block."""
    saved = {k: gates._COMPOSITES.pop(k) for k in OVERRIDES if k in gates._COMPOSITES}
    if name != "native":
        gates._COMPOSITES.update(OVERRIDES)
    try:
        yield
    finally:
        for k in OVERRIDES:
            gates._COMPOSITES.pop(k, None)
        gates._COMPOSITES.update(saved)


def load(key: str, batch: int, size: int):
    if key in CIFAR:
        return build(key, batch)
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = getattr(tvm, key)(weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image size of torchvision models")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    names = ["native", "lean"]
    print(f"torch {torch.__version__}, pyobc {pyobc.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}; time per scoring batch / one forward+backward (medians of {args.repeats})")
    for key in args.models:
        model, x, y = load(key, args.batch, args.size)
        for label in args.methods:
            method, options = METHODS[label]
            ratios = {n: [] for n in names}
            for _ in range(args.repeats):
                for n in names:
                    with variant(n):
                        t, fb = paired_times(model, x, y, method, options, 3)
                        ratios[n] += [a / b for a, b in zip(t, fb)]
            cells = "  ".join(f"{n} {statistics.median(r):5.2f}x" for n, r in ratios.items())
            print(f"{key:<16} {label:<9} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
