"""Cost of scoring Llama models relative to one forward+backward, at one thread.

For each model and criterion (``heads="kv"``, loss :func:`pyobc.losses.causal_lm`):

* time: the median seconds of one criterion update (the marginal time per batch inside ``pyobc.score``,
  batches 2.. of ``--batches``; tracing and setup excluded), per token and divided by the median time of one
  plain forward+backward of the same batch;
* memory (not with ``--quick``): the peak resident-memory growth of one scoring call (one batch, setup
  included) divided by that of one forward+backward, each in a fresh process over the model-loaded baseline
  (the approach of bench/bench_scoring.py).

Models (random initialisation: the cost does not depend on the weights): ``tiny``, the architecture of
``pyobc.models.trained_lm("tiny-llama")`` (hidden 128, 4 layers, 4 query / 2 KV heads, MLP 384), and
``wide`` (hidden 512, 8 layers, 8 query / 2 KV heads, MLP 1376). Batches of 4 x 128 tokens.

    python bench/bench_lm.py               # both models, jacobian and oba, with memory (about a minute or two)
    python bench/bench_lm.py --quick       # tiny only, no memory: a few seconds
    python bench/bench_lm.py --methods jacobian obd taylor --batch 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import torch

import pyobc
from pyobc.losses import causal_lm

from measure import median_seconds, peak_in_child, update_times

MODELS = {
    "tiny": {},
    "wide": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
             "intermediate_size": 1376},
}


def build(key: str, batch: int, seq_len: int):
    """The model (seeded random init, eval mode) and one batch of token ids."""
    torch.manual_seed(0)
    model = pyobc.models.tiny_llama(**MODELS[key]).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids


def time_fb(model, ids, repeats: int = 3) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    return median_seconds(lambda: torch.autograd.grad(causal_lm(model, ids), params), repeats)


def time_update(model, ids, method: str, batches: int) -> float:
    """Median seconds of one criterion update (batches 2.. when there are several), inside pyobc.score."""
    with update_times(method) as times:
        pyobc.score(model, [ids] * batches, method, loss_fn=causal_lm, heads="kv")
    return statistics.median(times[1:] if len(times) > 1 else times)


def peak_child(key: str, batch: int, seq_len: int, what: str) -> int:
    """Peak RSS growth (bytes) of one forward+backward (``what="fb"``) or one scoring call, in a fresh process."""
    setup = (f"import bench_lm as b, torch, torch_pruning\ntorch.set_num_threads(1)\nb.pyobc.methods()\n"
             f"model, ids = b.build({key!r}, {batch}, {seq_len})")
    call = ("torch.autograd.grad(b.causal_lm(model, ids), list(model.parameters()))" if what == "fb" else
            f"b.pyobc.score(model, [ids], {what!r}, loss_fn=b.causal_lm, heads='kv')")
    return peak_in_child(setup, call)


def measure(key: str, methods: list[str], args) -> list[dict]:
    model, ids = build(key, args.batch, args.seq_len)
    params = sum(p.numel() for p in model.parameters())
    tokens = ids.numel()
    fb_mem = peak_child(key, args.batch, args.seq_len, "fb") if args.memory else None
    rows = []
    for method in methods:
        fbs, ups = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both
            fbs.append(time_fb(model, ids))
            ups.append(time_update(model, ids, method, args.batches))
        fb, up = statistics.median(fbs), statistics.median(ups)
        row = {"model": key, "params": params, "method": method, "batch": list(ids.shape), "fb_ms": 1e3 * fb,
               "score_ms": 1e3 * up, "score_us_per_token": 1e6 * up / tokens,
               "ratio": statistics.median(u / f for u, f in zip(ups, fbs))}
        if fb_mem is not None:
            row["fb_mib"] = fb_mem / 2**20
            row["score_mib"] = peak_child(key, args.batch, args.seq_len, method) / 2**20
            row["mem_ratio"] = row["score_mib"] / max(row["fb_mib"], 1e-9)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    mem = (f" | {r['fb_mib']:8.1f} | {r['score_mib']:9.1f} | {r['mem_ratio']:6.2f}x" if "mem_ratio" in r
           else " |        - |         - |       -")
    return (f"| {r['model']:<5} | {r['params'] / 1e6:6.2f}M | {r['method']:<8} | {r['fb_ms']:8.1f} | "
            f"{r['score_ms']:8.1f} | {r['score_us_per_token']:7.1f} | {r['ratio']:5.2f}x{mem} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["jacobian", "oba"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="scoring batches per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (median)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory ratios")
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 batches, 1 repeat, no memory")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.repeats, args.memory = ["tiny"], 2, 1, False
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, batches of {args.batch}x{args.seq_len} tokens, heads='kv'; "
          f"score = median criterion update per batch (setup excluded), ratio = score / forward+backward; "
          f"memory = peak RSS growth (fresh process, one scoring call incl. setup) / that of a forward+backward\n")
    print("| model | params | method | fwd+bwd ms | score ms | us/token | ratio | fb MiB | score MiB | memory |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [r for key in args.models for r in measure(key, args.methods, args)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
