"""Cost of scoring relative to one forward+backward pass, measured side by side.

For each model and criterion: the median over batches of (time of one criterion update inside
``pyobc.score``, tracing and setup excluded) / (time of one plain forward+backward on the same batch, run
right before that update); and peak memory of scoring relative to a forward+backward, each
measured in a fresh subprocess as the growth of peak resident memory over the model-loaded baseline.

Run:
    python bench/bench_scoring.py                       # all models, all criteria
    python bench/bench_scoring.py --models resnet20 --methods jacobian obd --batch 64
    python bench/bench_scoring.py --memory              # also the memory ratios (slower)

Targets (issue #15, at 1 and at 2 threads): jacobian and taylor <= 1.1x, obd <= 1.5x, oba / oba-full /
sosp-h <= 2.5x, flat in depth (the ResNet-56 ratio within 20% of ResNet-20's); peak memory <= 2x.
``OMP_NUM_THREADS=1 python bench/bench_scoring.py`` for the 1-thread figures. On glibc the ratios depend on
the heap's trimming (``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` stops it): report
which allocator a figure was measured with (README, "CPU allocator").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from measure import peak_in_child, update_times

MODELS = {
    "resnet20": dict(name="resnet20", in_channels=3, input_size=32),
    "resnet56": dict(name="resnet56", in_channels=3, input_size=32),
    "vit_tiny": dict(name="vit_tiny", in_channels=3, input_size=32),
}
# (label, method, options)
METHODS = [
    ("jacobian", "jacobian", {}),
    ("obd", "obd", {}),
    ("taylor", "taylor", {}),
    ("oba", "oba", {}),
    ("oba-full", "oba", {"hessian": "full"}),
    ("sosp-h", "sosp-h", {}),
]


def build(model_key: str, batch: int):
    import pyobc

    spec = dict(MODELS[model_key])
    torch.manual_seed(0)
    model = pyobc.models.get(spec.pop("name"), num_classes=10, **spec).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec["in_channels"], spec["input_size"], spec["input_size"], generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, x, y


def fwd_bwd(model, x, y):
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, params)


def paired_times(model, x, y, method, options, batches: int) -> tuple[list[float], list[float]]:
    """Seconds of each criterion update inside pyobc.score (the first batch dropped) and of the plain
    forward+backward run right before it: neighbours in time, so the machine's drift (2x within an hour
    on the shared CPU hosts we measure on) hits both sides of each pair alike."""
    import pyobc

    fbs: list[float] = []
    with update_times(method, before=(lambda: fwd_bwd(model, x, y), fbs)) as times:
        pyobc.score(model, [(x, y)] * batches, method, **options)
    keep = slice(1, None) if len(times) > 1 else slice(None)
    return times[keep], fbs[keep]


def _peak_child(model_key: str, batch: int, what: str, options: dict) -> int:
    """Peak RSS growth (bytes) of one forward+backward or one scoring batch, in a fresh process."""
    setup = (f"import json, torch, pyobc, torch_pruning\nfrom bench_scoring import build, fwd_bwd\n"
             f"model, x, y = build({model_key!r}, {batch})\nfrom pyobc.criteria import methods; methods()")
    call = ("fwd_bwd(model, x, y)" if what == "fb" else
            f"pyobc.score(model, [(x, y)], {what!r}, **json.loads({json.dumps(json.dumps(options))}))")
    return peak_in_child(setup, call)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="scoring batches per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (median)")
    parser.add_argument("--memory", action="store_true", help="also measure peak-memory ratios")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    import pyobc

    available = pyobc.methods()
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}; "
          f"ratios = criterion time per batch / one forward+backward (medians)")
    for key in args.models:
        model, x, y = build(key, args.batch)
        for label, method, options in METHODS:
            if label not in args.methods or method not in available:
                continue
            ratios, fbs, ts = [], [], []
            for _ in range(args.repeats):  # every update paired with the forward+backward right before it
                t, fb = paired_times(model, x, y, method, options, args.batches)
                fbs += fb
                ts += t
                ratios += [a / b for a, b in zip(t, fb)]
            row = {"model": key, "method": label, "fwd_bwd_ms": 1e3 * statistics.median(fbs),
                   "score_ms": 1e3 * statistics.median(ts), "ratio": statistics.median(ratios)}
            if args.memory:
                fb_mem = _peak_child(key, args.batch, "fb", {})
                sc_mem = _peak_child(key, args.batch, method, options)
                row["mem_ratio"] = sc_mem / max(fb_mem, 1)
            rows.append(row)
            mem = f"  memory {row['mem_ratio']:.2f}x" if "mem_ratio" in row else ""
            print(f"{key:<10} {label:<10} fwd+bwd {row['fwd_bwd_ms']:8.1f} ms   score {row['score_ms']:8.1f} ms"
                  f"   ratio {row['ratio']:5.2f}x{mem}", flush=True)
    by = {(r["model"], r["method"]): r["ratio"] for r in rows}
    for label in args.methods:
        if ("resnet20", label) in by and ("resnet56", label) in by:
            print(f"depth check {label}: resnet56/resnet20 ratio = {by[('resnet56', label)] / by[('resnet20', label)]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
