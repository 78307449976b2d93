"""Real architectures: the coverage table of docs/models.md, and setup / per-batch / memory figures.

    python bench/bench_models.py --table          # run every configuration, rewrite the table in docs/models.md
    python bench/bench_models.py                  # cost figures for resnet50, mobilenet_v2, convnext_tiny, swin_t, ViT
    python bench/bench_models.py --models tv_resnet50 --methods jacobian oba --batch 8

The models, batches and configurations are those of the test suite (tests/real_models.py: random
initialisation, torchvision imported with its CPU workaround). Cost figures, per model and criterion:

* setup: seconds of ``pyobc.score`` before the first batch (tracing, groups, index maps), measured as the
  time of a one-batch run minus the criterion's update, and as a multiple of one forward+backward;
* per batch: median seconds of one criterion update (batches 2.. of 4) ÷ one forward+backward on the
  same batch;
* memory: peak resident-memory growth of one scoring call ÷ that of one forward+backward, each measured
  in a fresh process over the model-loaded baseline (the approach of bench/bench_scoring.py).

Timings on a shared machine are noisy; the ratios are measured side by side in one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import real_models as rm  # noqa: E402  (tests/real_models.py: the contained torchvision import)

import pyobc  # noqa: E402
from measure import median_seconds, peak_in_child, update_times  # noqa: E402

COST_MODELS = ["tv_resnet50", "tv_mobilenet_v2", "tv_convnext_tiny", "tv_swin_t", "tv_vit"]
COST_METHODS = ["jacobian", "obd", "oba", "sosp-h", "ec"]
TABLE_START, TABLE_END = "<!-- coverage table: start -->", "<!-- coverage table: end -->"


def fwd_bwd(name: str, model, batch) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(rm.loss_of(name, model, batch), params, allow_unused=True)


def time_fb(name: str, model, batch, repeats: int = 3) -> float:
    return median_seconds(lambda: fwd_bwd(name, model, batch), repeats)


def time_score(name: str, model, batch, method: str, batches: int) -> tuple[float, list[float]]:
    """(total seconds of pyobc.score, seconds of each criterion update)."""
    with update_times(method) as updates:
        t0 = time.perf_counter()
        pyobc.score(model, [batch] * batches, method, loss_fn=rm.ARCHS[name].loss_fn)
        total = time.perf_counter() - t0
    return total, updates


def peak_child(name: str, batch: int, what: str) -> int:
    """Peak RSS growth (bytes) of one forward+backward (``what="fb"``) or one scoring call, in a fresh process."""
    setup = (f"import bench_models as bm\nimport torch_pruning\nfrom pyobc.criteria import methods; methods()\n"
             f"model, batch = bm.rm.build({name!r}, {batch})")
    call = (f"bm.fwd_bwd({name!r}, model, batch)" if what == "fb" else
            f"bm.pyobc.score(model, [batch], {what!r}, loss_fn=bm.rm.ARCHS[{name!r}].loss_fn)")
    return peak_in_child(setup, call)


def cost_rows(models: list[str], methods: list[str], batch: int, memory: bool) -> list[dict]:
    rows = []
    for name in models:
        model, data = rm.build(name, batch)
        fb = time_fb(name, model, data)
        fb_mem = peak_child(name, batch, "fb") if memory else None
        for method in methods:
            total1, ups1 = time_score(name, model, data, method, 1)
            _, ups = time_score(name, model, data, method, 4)
            per_batch = statistics.median(ups[1:])
            row = {"model": name, "method": method, "batch": batch, "fb_s": fb, "setup_s": total1 - sum(ups1),
                   "setup_fb": (total1 - sum(ups1)) / fb, "per_batch_fb": per_batch / fb}
            if memory:
                row["mem_fb"] = peak_child(name, batch, method) / max(fb_mem, 1)
            rows.append(row)
            mem = f"  memory {row['mem_fb']:.2f}x" if memory else ""
            print(f"{name:20s} {method:9s} setup {row['setup_s']:6.2f}s ({row['setup_fb']:5.1f} fwd+bwd)  "
                  f"per batch {row['per_batch_fb']:5.2f}x{mem}", flush=True)
    return rows


def coverage(names: list[str]) -> dict[str, dict[str, rm.Outcome]]:
    """Every configuration of every architecture (as tests/test_real_models.py runs them)."""
    torch.set_num_threads(1)
    result: dict[str, dict[str, rm.Outcome]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            state = rm.State(name)
            result[name] = {c: rm.run_config(state, c, tmp) for c in rm.CONFIGS}
            print(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return result


def _cell(o: rm.Outcome) -> str:
    return {"ok": "ok", "refused": "refused", "failed": "**fails**"}[o.status]


def table_markdown(result: dict[str, dict[str, rm.Outcome]]) -> str:
    head = "| architecture | " + " | ".join(rm.CONFIGS) + " |\n|---|" + "---|" * len(rm.CONFIGS) + "\n"
    body = "".join(f"| {n} | " + " | ".join(_cell(r[c]) for c in rm.CONFIGS) + " |\n" for n, r in result.items())
    notes = [f"* {n} / {c} — {o.status}: {o.detail}" for n, r in result.items() for c, o in r.items()
             if o.status != "ok"]
    return head + body + ("\nWhy each configuration that is not ok is not:\n\n" + "\n".join(notes) + "\n"
                          if notes else "")


def write_table(text: str, path: Path) -> None:
    doc = path.read_text()
    start, end = doc.index(TABLE_START) + len(TABLE_START), doc.index(TABLE_END)
    path.write_text(doc[:start] + "\n" + text + doc[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="rewrite the coverage table in docs/models.md")
    parser.add_argument("--models", nargs="*", help="architectures (default: all for --table, five for costs)")
    parser.add_argument("--methods", nargs="*", default=COST_METHODS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-memory", action="store_true", help="skip the (slower) memory ratios")
    parser.add_argument("--json", type=Path, help="also write the rows / outcomes as JSON here")
    args = parser.parse_args(argv)
    if args.table:
        result = coverage(args.models or list(rm.ARCHS))
        text = table_markdown(result)
        write_table(text, ROOT / "docs" / "models.md")
        print(text)
        data = {n: {c: vars(o) for c, o in r.items()} for n, r in result.items()}
    else:
        data = cost_rows(args.models or COST_MODELS, args.methods, args.batch, not args.no_memory)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
