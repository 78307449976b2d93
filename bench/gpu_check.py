"""Measurements of ``bench/gpu_check.sh``: op bandwidth, scoring cost, pruning speed-up on one device.

    python bench/gpu_check.py ops      --device cuda --json build/gpu/ops.json
    python bench/gpu_check.py scoring  --device cuda --json build/gpu/scoring.json
    python bench/gpu_check.py report   --json build/gpu/ops.json build/gpu/scoring.json --output bench/RESULTS-gpu.md

``--small`` shrinks every shape (the script's ``--dry-run`` runs this on CPU so CI keeps it working).

* ``ops``: a device-to-device copy measured in the same run is the bandwidth reference; every op's
  achieved GB/s (bytes it must read and write ÷ median time) and its percentage of that copy.
* ``scoring``: ResNet-50 (torchvision's if it imports, else the ResNet-50-shaped model below), batch 64
  at 224×224, and a ViT-B/16-shaped model (batch 32): for jacobian, obd, oba, oba full and sosp-h the
  median time of one scoring batch ÷ one forward+backward on the same batch, and the peak memory of
  one scoring batch ÷ that of one forward+backward (CUDA allocator peaks above the model-loaded
  baseline); then ``pyobc.prune`` of the ResNet to 50% of its MACs (jacobian scores) and the pruned
  model's measured inference speed-up; and OBA's forward-over-reverse against its reverse-over-reverse
  channel scores on the ResNet (batch 8, both Hessians): the CUDA run of the forward-mode path.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
import pyobc.ops as ops

from measure import update_times

METHODS = [("jacobian", "jacobian", {}), ("obd", "obd", {}), ("oba", "oba", {}),
           ("oba full", "oba", {"hessian": "full"}), ("sosp-h", "sosp-h", {})]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# ops: GB/s against a device copy
# ---------------------------------------------------------------------------------------------

def op_cases(device, scale: float):
    """name -> (fn, bytes the op must move at least)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*[max(1, int(s)) for s in shape], generator=g).to(device)

    n = lambda s: max(1, int(s * scale))  # noqa: E731
    a, b = rand(n(128), 256, 32, 32), rand(n(128), 256, 32, 32)
    sc = rand(256)
    ta, tb = rand(n(256), 197, 768), rand(n(256), 197, 768)
    w, t = rand(n(2048), 1024, 3, 3), rand(n(2048), 1024, 3, 3)
    rows, cols, outs = 64, n(1 << 20), n(1 << 18)
    v = rand(rows, cols)
    counts = torch.randint(1, 5, (outs,), generator=g)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
    col = torch.randint(0, cols, (int(counts.sum()),), generator=g).to(device)
    keep = torch.randperm(w.shape[0], generator=g)[: w.shape[0] // 2].to(device)
    # OBD's squared per-sample weight gradients of a ResNet-50 stage-4 conv (3x3, 512 channels, 7x7)
    sx, sg = rand(n(64), 512, 7, 7), rand(n(64), 512, 7, 7)
    sq = ((3, 3), (1, 1), (1, 1), (1, 1))
    nbytes = lambda *ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    return {
        f"channel_dot {tuple(a.shape)} dim=1": (lambda: ops.channel_dot(a, b, 1), nbytes(a, b)),
        f"channel_dot {tuple(a.shape)} per_sample": (lambda: ops.channel_dot(a, b, 1, True), nbytes(a, b)),
        f"channel_dot tokens {tuple(ta.shape)} dim=-1": (lambda: ops.channel_dot(ta, tb, -1), nbytes(ta, tb)),
        f"channel_scale {tuple(a.shape)} dim=1": (lambda: ops.channel_scale(a, sc, 1), 2 * nbytes(a)),
        f"weight_channel_sums {tuple(w.shape)}": (lambda: ops.weight_channel_sums(w, t), nbytes(w, t)),
        f"csr_gather_sum {rows} rows x {cols} -> {outs}":
            (lambda: ops.csr_gather_sum(v, rowptr, col, check=False), rows * col.numel() * 4 + rows * outs * 4 + nbytes(rowptr, col)),
        f"gather_channels {tuple(w.shape)} dim=0 keep 1/2":
            (lambda: ops.gather_channels([w], [0], [keep]), nbytes(w)),  # reads half, writes half
        # compute-bound (a GEMM per sample): the GB/s column counts the inputs and output only
        f"conv2d_sq_grad_sums {tuple(sx.shape)} 3x3":
            (lambda: ops.conv2d_sq_grad_sums(sx, sg, *sq), nbytes(sx, sg) + 512 * 512 * 9 * 4),
    }


def run_ops(device, scale: float, reps: int) -> dict:
    x = torch.empty(int((1 << 28) * scale), device=device)
    y = torch.empty_like(x)
    copy_s = median_time(lambda: y.copy_(x), device, reps)
    copy_gbs = 2 * x.numel() * 4 / copy_s / 1e9
    rows = []
    for name, (fn, moved) in op_cases(device, scale).items():
        s = median_time(fn, device, reps)
        gbs = moved / s / 1e9
        rows.append({"op": name, "ms": 1e3 * s, "MB": moved / 1e6, "GB/s": gbs, "pct_copy": 100 * gbs / copy_gbs})
        print(f"{name:<55} {1e3 * s:9.3f} ms {gbs:9.1f} GB/s {100 * gbs / copy_gbs:6.1f}% of copy", flush=True)
    backends = {k: v["cuda" if device.type == "cuda" else "cpu"] for k, v in ops.backend_report()["ops"].items()}
    return {"device": _device_name(device), "copy_GB/s": copy_gbs, "rows": rows, "backends": backends}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet50Shaped(nn.Module):
    """torchvision's ResNet-50 layout (bottlenecks 3-4-6-3, widths 64-512, stride on the 3x3)."""

    def __init__(self, num_classes: int = 1000, base: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], base
        for i, (width, n) in enumerate([(base, 3), (2 * base, 4), (4 * base, 6), (8 * base, 3)]):
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def _torchvision():
    try:
        import torchvision.models as tvm
        return tvm
    except Exception:  # noqa: BLE001 - absent, or a build that does not import here
        return None


def build_models(small: bool):
    """[(name, model, batch, image size)]: real architectures where torchvision imports."""
    tvm = None if small else _torchvision()
    if tvm is not None:
        resnet, rname = tvm.resnet50(weights=None, num_classes=1000), "resnet50 (torchvision)"
        vit, vname = tvm.vit_b_16(weights=None, num_classes=1000), "vit_b_16 (torchvision)"
        nn.init.normal_(vit.heads.head.weight, std=0.02)  # zero-initialised: every gradient would be 0
    else:
        resnet = ResNet50Shaped(base=8 if small else 64)
        rname = "ResNet-50-shaped (bench)" if not small else "ResNet-50-shaped, 1/8 width"
        size = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0) if small else \
            dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
        vit = pyobc.models.vit.VisionTransformer(1000, 3, 32 if small else 224, 16 if not small else 8, **size)
        vname = "ViT-B/16-shaped (pyobc.models.vit)" if not small else "ViT (small)"
    if small:
        return [(rname, resnet, 4, 32), (vname, vit, 4, 32)]
    return [(rname, resnet, 64, 224), (vname, vit, 32, 224)]


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------

def fwd_bwd(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(F.cross_entropy(model(x), y), params)


def score_time(model, x, y, method, options, batches: int, device) -> float:
    """Median seconds of one criterion update inside pyobc.score (tracing and setup excluded)."""
    with update_times(method, sync=lambda: _sync(device)) as times:
        pyobc.score(model, [(x, y)] * batches, method, progress=False, **options)
    return statistics.median(times[1:] if len(times) > 1 else times)


def peak_bytes(fn, device) -> int | None:
    """Peak CUDA memory of ``fn`` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def score_model(name, model, batch, size, device, batches: int, reps: int) -> list[dict]:
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    fb = median_time(lambda: fwd_bwd(model, x, y), device, reps)
    fb_mem = peak_bytes(lambda: fwd_bwd(model, x, y), device)
    rows = []
    for label, method, options in METHODS:
        t = score_time(model, x, y, method, options, batches, device)
        mem = peak_bytes(lambda: pyobc.score(model, [(x, y)], method, progress=False, **options), device)
        row = {"model": name, "method": label, "fwd_bwd_ms": 1e3 * fb, "score_ms": 1e3 * t, "ratio": t / fb,
               "mem_ratio": None if mem is None else mem / max(fb_mem, 1)}
        rows.append(row)
        mem_s = "n/a" if mem is None else f"{row['mem_ratio']:.2f}x"
        print(f"{name:<36} {label:<9} fwd+bwd {1e3 * fb:8.1f} ms score {1e3 * t:8.1f} ms "
              f"ratio {t / fb:5.2f}x memory {mem_s}", flush=True)
    return rows


def prune_speedup(name, model, batch, size, device, reps: int) -> dict:
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    scores = pyobc.score(model, [(x, y)], "jacobian", progress=False)
    small, report = pyobc.prune(model, scores, 0.5, target="macs", example_inputs=x[:2], progress=False)
    with torch.no_grad():
        before = median_time(lambda: model(x), device, reps)
        after = median_time(lambda: small.eval()(x), device, reps)
    out = {"model": name, "macs_before": report.macs_before, "macs_after": report.macs_after,
           "params_before": report.params_before, "params_after": report.params_after,
           "infer_ms_before": 1e3 * before, "infer_ms_after": 1e3 * after, "speedup": before / after}
    print(f"prune {name}: MACs {report.macs_before / 1e6:,.1f} M -> {report.macs_after / 1e6:,.1f} M, "
          f"inference {1e3 * before:.1f} -> {1e3 * after:.1f} ms ({before / after:.2f}x)", flush=True)
    return out


def oba_parity(name, model, size, device) -> dict:
    """OBA's forward-over-reverse and reverse-over-reverse channel scores on one batch of 8, both Hessians:
    the largest difference relative to the largest score (float32 rounding on CPU: at most 4e-6)."""
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (8,), generator=g).to(device)
    out = {"model": name}
    for hessian in ("inter-layer", "full"):
        kw = dict(hessian=hessian, normalize="none", group_reduction="sum", progress=False)
        a, b = (torch.cat([v.flatten() for v in pyobc.score(model, [(x, y)], "oba", ad=ad, **kw).values]).double()
                for ad in ("forward", "reverse"))
        out[hessian] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    ok = max(out["inter-layer"], out["full"]) < 1e-3
    out["ok"] = ok
    print(f"oba forward vs reverse on {name}: max relative difference {out['inter-layer']:.1e} (inter-layer), "
          f"{out['full']:.1e} (full) -> {'ok' if ok else 'FAILED'}", flush=True)
    return out


def run_scoring(device, small: bool, batches: int, reps: int) -> dict:
    models = build_models(small)
    rows = []
    for name, model, batch, size in models:
        rows += score_model(name, model, batch, size, device, batches, reps)
    name, model, batch, size = models[0]
    return {"device": _device_name(device), "rows": rows,
            "prune": prune_speedup(name, model, batch, size, device, reps),
            "oba_parity": oba_parity(name, model, size, device),
            "shapes": {n: f"batch {b}, {s}x{s}" for n, _, b, s in models}}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def report(parts: list[dict], header: str) -> str:
    lines = ["# GPU results (`bash bench/gpu_check.sh`)", "", header, ""]
    for part in parts:
        if "copy_GB/s" in part:
            lines += [f"## Ops on {part['device']}", "",
                      f"Reference: a device-to-device copy measured in the same run, {part['copy_GB/s']:.0f} GB/s "
                      f"(read + write). Backends: " + ", ".join(f"{k} {v}" for k, v in part["backends"].items()), "",
                      "| op | MB moved | ms | GB/s | % of copy |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['op']} | {r['MB']:.0f} | {r['ms']:.3f} | {r['GB/s']:.0f} | {r['pct_copy']:.0f}% |"
                      for r in part["rows"]]
        else:
            lines += [f"## Scoring on {part['device']}", "",
                      "Time: median of one scoring batch ÷ one forward+backward on the same batch; memory: peak "
                      "CUDA memory of one scoring batch ÷ that of one forward+backward. Shapes: "
                      + "; ".join(f"{k}: {v}" for k, v in part["shapes"].items()), "",
                      "| model | method | fwd+bwd ms | score ms | time ratio | memory ratio |",
                      "|---|---|---:|---:|---:|---:|"]
            for r in part["rows"]:
                mem = "n/a" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}×"
                lines.append(f"| {r['model']} | {r['method']} | {r['fwd_bwd_ms']:.1f} | {r['score_ms']:.1f} | "
                             f"{r['ratio']:.2f}× | {mem} |")
            p = part["prune"]
            lines += ["", f"`pyobc.prune` of {p['model']} to 50% of its MACs (jacobian scores): MACs "
                      f"{p['macs_before'] / 1e6:,.1f} M → {p['macs_after'] / 1e6:,.1f} M (the 2-sample example input), parameters "
                      f"{p['params_before'] / 1e6:.1f} M → {p['params_after'] / 1e6:.1f} M, inference "
                      f"{p['infer_ms_before']:.1f} → {p['infer_ms_after']:.1f} ms: **{p['speedup']:.2f}× faster**."]
            q = part.get("oba_parity")
            if q:
                lines += ["", f"OBA forward-over-reverse vs reverse-over-reverse on {q['model']} (batch 8): largest "
                          f"difference ÷ largest score {q['inter-layer']:.1e} (inter-layer), {q['full']:.1e} (full): "
                          f"**{'ok' if q['ok'] else 'FAILED'}**."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ops", "scoring", "report"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (the dry run)")
    parser.add_argument("--json", nargs="+", default=[], help="output file (ops/scoring) or inputs (report)")
    parser.add_argument("--output", help="report: the Markdown file to write")
    parser.add_argument("--header", default="")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args(argv)
    if args.what == "report":
        parts = [json.load(open(p)) for p in args.json]
        text = report(parts, args.header)
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
        return 0
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = (run_ops(device, 1 / 64 if args.small else 1.0, args.reps) if args.what == "ops"
              else run_scoring(device, args.small, args.batches, args.reps))
    if args.json:
        with open(args.json[0], "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
