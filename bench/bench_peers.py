"""pyobc's taylor / obd / jacobian against Torch-Pruning's importances, side by side in one run.

    python bench/bench_peers.py                                   # resnet20 and resnet56, batch 64
    python bench/bench_peers.py --models resnet56 --batches 2 --repeats 3

Same model, same batches, same process, measurements interleaved. For ``B`` batches:

* pyobc: the criterion's per-batch updates plus its finalize (the group reductions), i.e.
  ``pyobc.score`` without the one-off tracing and setup;
* Torch-Pruning 1.6.1 (``tp.importance.*``, groups from its DependencyGraph built once, not timed):
  its data pass per batch, then one loop over all groups calling the importance, as its pruners do:
  - ``TaylorImportance``: ``loss.backward()`` per batch (gradients add up in ``.grad``);
  - ``HessianImportance``: per batch, one backward per sample (``reduction="none"``) and
    ``accumulate_grad`` (its documented use: its diagonal empirical Fisher needs per-sample gradients);
  - ``GroupMagnitudeImportance`` (p=2) against pyobc's ``magnitude``: no data, the group loop only.

``jacobian`` has no Torch-Pruning counterpart; it is set against ``TaylorImportance``, the peer's
first-order gradient criterion (the same data pass: one forward+backward per batch).

Reported: milliseconds per batch (total / B) of each side, the ratio Torch-Pruning / pyobc, and one
forward+backward for scale. Read the ratios: the machine may be shared.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import importlib.metadata

import torch_pruning as tp

import pyobc
from pyobc.criteria import get_method

MODELS = {"resnet20": "resnet20", "resnet56": "resnet56"}
PAIRS = [  # (pyobc method, Torch-Pruning importance factory, Torch-Pruning data pass)
    ("taylor", lambda: tp.importance.TaylorImportance(), "backward"),
    ("obd", lambda: tp.importance.HessianImportance(), "per_sample"),
    ("jacobian", lambda: tp.importance.TaylorImportance(), "backward"),
    ("magnitude", lambda: tp.importance.GroupMagnitudeImportance(p=2), None),
]


def build(key: str, batch: int, batches: int):
    torch.manual_seed(0)
    model = pyobc.models.get(MODELS[key], num_classes=10, in_channels=3, input_size=32).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]
    return model, data


def pyobc_time(model, data, method: str) -> float:
    """Seconds of the criterion's updates and finalize inside pyobc.score."""
    cls, spent = get_method(method), [0.0]
    update, finalize = cls.update, cls.finalize

    def timed(fn):
        def run(self, *args):
            t0 = time.perf_counter()
            out = fn(self, *args)
            spent[0] += time.perf_counter() - t0
            return out
        return run

    cls.update, cls.finalize = timed(update), timed(finalize)
    try:
        pyobc.score(model, data, method, progress=False)
    finally:
        cls.update, cls.finalize = update, finalize
    return spent[0]


def tp_groups(model, example):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]  # the classifier
    return list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))


def tp_time(model, groups, data, make_importance, data_pass) -> float:
    """Seconds of Torch-Pruning's data passes over ``data`` and one importance call per group."""
    importance = make_importance()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for x, y in data:
        if data_pass == "backward":
            F.cross_entropy(model(x), y).backward()
        elif data_pass == "per_sample":
            losses = F.cross_entropy(model(x), y, reduction="none")
            for i, loss in enumerate(losses):
                model.zero_grad()
                loss.backward(retain_graph=i < len(losses) - 1)
                importance.accumulate_grad(model)
    for group in groups:
        importance(group)
    spent = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return spent


def fwd_bwd_time(model, x, y) -> float:
    t0 = time.perf_counter()
    torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=[p[0] for p in PAIRS])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, torch-pruning {importlib.metadata.version('torch-pruning')}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.batches} batches; ms per batch (medians), ratio = Torch-Pruning / pyobc")
    for key in args.models:
        model, data = build(key, args.batch, args.batches)
        peer = copy.deepcopy(model)  # Torch-Pruning writes .grad and its tracer touches train/eval flags
        groups = tp_groups(peer, data[0][0][:2])
        peer.eval()
        fb = statistics.median(fwd_bwd_time(model, *data[0]) for _ in range(3))
        for method, make_importance, data_pass in PAIRS:
            if method not in args.methods:
                continue
            ours, theirs = [], []
            for _ in range(args.repeats):  # interleaved: drift hits both sides
                ours.append(pyobc_time(model, data, method) / args.batches)
                theirs.append(tp_time(peer, groups, data, make_importance, data_pass) / args.batches)
            o, t = statistics.median(ours), statistics.median(theirs)
            peer_name = type(make_importance()).__name__
            print(f"{key:<9} pyobc {method:<10} {1e3 * o:9.1f} ms | {peer_name:<24} {1e3 * t:9.1f} ms | "
                  f"ratio {t / o:6.2f}x | fwd+bwd {1e3 * fb:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
