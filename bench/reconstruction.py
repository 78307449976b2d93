"""One-shot pruning with and without layer-wise reconstruction (no fine-tuning).

For each model (ResNet-20 and VGG-11 trained on the digits, 16x16) and criterion, removes 30% and 50% of the
MACs with ``pyobc.prune`` (global scope; ``magnitude`` local) and prints the test accuracy: plain, with
``reconstruct=`` (least-squares refit of the layers that lost inputs), and with the reconstruction-aware
selections ``selection="scores*obs"`` and ``"obs"`` (the latter does not depend on the criterion: one row per
model). Also the reconstruction's cost in calibration passes and its peak working set.

    python bench/reconstruction.py                       # everything (several minutes on 2 cores)
    python bench/reconstruction.py --models resnet20 --methods taylor jacobian --ratios 0.5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import pyobc
from pyobc import datasets, models

METHODS = ["magnitude", "taylor", "obd", "jacobian", "oba", "sosp-h", "ec"]


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg11"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--batches", type=int, default=8, help="scoring batches (of 64)")
    p.add_argument("--calibration", type=int, default=8, help="calibration batches (of 64) for reconstruction")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--no-obs", action="store_true", help="skip the reconstruction-aware selections")
    return p.parse_args(argv)


def _prune_row(model, scores, ratio, scope, x, test, calib, a, selection=None):
    """Accuracy plain / reconstructed (or reconstructed with a selection); cost of the reconstruction."""
    if selection is None:
        small, _ = pyobc.prune(model, scores, ratio, scope=scope, target="macs", example_inputs=x)
        return models.evaluate(small, test), None
    small, report = pyobc.prune(model, scores, ratio, scope=scope, target="macs", example_inputs=x,
                                reconstruct=calib, reconstruct_batches=a.calibration, damping=a.damping,
                                selection=selection)
    return models.evaluate(small, test), report.reconstruction


def main(argv=None) -> None:
    a = _args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train = datasets.digits("train", batch_size=64, image_size=16, channels=1, shuffle=False)
    calib = datasets.digits("train", batch_size=64, image_size=16, channels=1, seed=2)
    test = datasets.digits("test", batch_size=256, image_size=16, channels=1)
    print("| model | criterion | MACs removed | acc pruned | + reconstructed | scores*obs + reconstructed | "
          "cost (calibration passes) | peak working set |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in a.models:
        model = models.trained(name, image_size=16, channels=1).eval()
        x = next(iter(train))[0][:2]
        print(f"| {name} | (unpruned) | 0% | {models.evaluate(model, test):.2%} | | | | |", flush=True)
        for method in a.methods:
            scope = "local" if method == "magnitude" else "global"
            scores = pyobc.score(model, train, method, max_batches=a.batches)
            for ratio in a.ratios:
                plain, _ = _prune_row(model, scores, ratio, scope, x, test, calib, a)
                rec, rep = _prune_row(model, scores, ratio, scope, x, test, calib, a, "scores")
                both = "-" if a.no_obs else \
                    f"{_prune_row(model, scores, ratio, scope, x, test, calib, a, 'scores*obs')[0]:.2%}"
                print(f"| {name} | {method} | {ratio:.0%} | {plain:.2%} | {rec:.2%} | {both} | {rep.passes:.1f} | "
                      f"{rep.peak_bytes / 2**20:.1f} MiB |", flush=True)
        if not a.no_obs:
            scores = pyobc.score(model, train, "magnitude")
            for ratio in a.ratios:
                acc, rep = _prune_row(model, scores, ratio, "global", x, test, calib, a, "obs")
                print(f"| {name} | obs (alone, global) | {ratio:.0%} | - | {acc:.2%} | | {rep.passes:.1f} | "
                      f"{rep.peak_bytes / 2**20:.1f} MiB |", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(sys.argv[1:])
    print(f"\n({time.perf_counter() - t0:.0f} s)")
