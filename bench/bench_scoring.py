"""Cost of scoring relative to one forward+backward pass, measured side by side.

For each model and criterion: median time per batch of ``pyobc.score`` (tracing excluded: the scoring
loop's own time over several batches, minus nothing else) divided by the median time of one plain
forward+backward on the same batch; and peak memory of scoring relative to a forward+backward, each
measured in a fresh subprocess as the growth of peak resident memory over the model-loaded baseline.

Run:
    python bench/bench_scoring.py                       # all models, all criteria
    python bench/bench_scoring.py --models resnet20 --methods jacobian obd --batch 64
    python bench/bench_scoring.py --memory              # also the memory ratios (slower)

Targets (issue #15, at 1 and at 2 threads): jacobian and taylor <= 1.1x, obd <= 1.5x, oba / oba-full /
sosp-h <= 2.5x, flat in depth (the ResNet-56 ratio within 20% of ResNet-20's); peak memory <= 2x.
``OMP_NUM_THREADS=1 python bench/bench_scoring.py`` for the 1-thread figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

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


def time_per_batch(model, x, y, method, options, batches: int) -> float:
    """Median seconds of one criterion update (one batch), measured inside pyobc.score."""
    import pyobc
    from pyobc.criteria import get_method

    cls = get_method(method)
    times: list[float] = []
    original = cls.update

    def timed(self, batch):
        t0 = time.perf_counter()
        original(self, batch)
        times.append(time.perf_counter() - t0)

    cls.update = timed
    try:
        pyobc.score(model, [(x, y)] * batches, method, **options)
    finally:
        cls.update = original
    return statistics.median(times[1:] if len(times) > 1 else times)


def time_fb(model, x, y, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fwd_bwd(model, x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _peak_child(model_key: str, batch: int, what: str, options: dict) -> int:
    """Peak RSS growth (bytes) of one forward+backward or one scoring batch, in a fresh process:
    the high-water mark after the call minus the resident size just before it."""
    code = f"""
import ctypes, gc, json, os, sys, threading, time, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from bench_scoring import build, fwd_bwd
import pyobc
model, x, y = build({model_key!r}, {batch})
from pyobc.criteria import methods; methods()
import torch_pruning  # imported before the baseline, like every other module scoring needs
page = os.sysconf("SC_PAGE_SIZE")
def rss():  # current resident set in bytes (not the high-water mark)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = rss()
peak = [base]
done = threading.Event()
def sample():  # torch releases the GIL in its kernels, so this thread keeps sampling
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
t = threading.Thread(target=sample, daemon=True)
t.start()
what = {what!r}
if what == "fb":
    fwd_bwd(model, x, y)
else:
    pyobc.score(model, [(x, y)], what, **json.loads({json.dumps(json.dumps(options))}))
done.set(); t.join()
print(max(peak[0], rss()) - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


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
            for _ in range(args.repeats):  # interleave the two measurements: drift hits both
                fb = time_fb(model, x, y, 3)
                t = time_per_batch(model, x, y, method, options, args.batches)
                fbs.append(fb)
                ts.append(t)
                ratios.append(t / fb)
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
