"""Peak memory of block-by-block scoring (``pyobc.score(..., blockwise=True)``) against whole-model
scoring, on random Llama-shaped models, and an extrapolation to a 7B-shaped configuration.

    python bench/bench_blockwise.py             # hidden 256, 4/8/16 layers, batch 4 x 128 tokens, 1 thread
    python bench/bench_blockwise.py --quick     # a few seconds: hidden 64, 2/4 layers

Every figure is the peak resident-memory growth of one call over the model-loaded baseline, measured in
a fresh process (the method of bench/bench_models.py), as a multiple of one forward+backward of the
whole model on the same batch. Block-by-block peak = the recorded hidden states of one batch ((L + 1) x
B x T x hidden floats) + the head's pass + one layer's scoring pass; the last term does not grow with
depth. The 7B figure extrapolates the measured per-layer pass by its activation count (see
:func:`layer_elements`) at the 7B shape, in bfloat16 (2 bytes), batch 1 x 2048 tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import peak_in_child

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


def peak_child(config: dict, batch: int, seq: int, what: str, method: str = "") -> int:
    """Peak RSS growth (bytes) of one forward+backward (``what="fb"``), whole-model scoring
    (``"whole"``) or block-by-block scoring (``"blocks"``) in a fresh process."""
    setup = f"""
import types
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
import torch, pyobc, warnings
warnings.simplefilter("ignore"); torch.set_num_threads(1); torch.manual_seed(0)
from pyobc.losses import causal_lm
model = pyobc.models.tiny_llama(**{config!r})
ids = torch.randint(0, model.config.vocab_size, ({batch}, {seq}))
import torch_pruning; pyobc.methods()
"""
    call = ("causal_lm(model, ids).backward()" if what == "fb" else
            f"pyobc.score(model, [ids], {method!r}, loss_fn=causal_lm, blockwise={what == 'blocks'})")
    return peak_in_child(setup, call)


def layer_elements(hidden: int, inter: int, heads: int, kv_heads: int, batch: int, seq: int) -> int:
    """Activation elements one Llama decoder layer keeps for its backward: the norms' inputs and outputs,
    q/k/v/o, the attention probabilities (heads x T x T), and the MLP's gate, up, product and down input."""
    head_dim = hidden // heads
    per_token = 4 * hidden + 2 * heads * head_dim + 2 * kv_heads * head_dim + 4 * inter
    return batch * (seq * per_token + heads * seq * seq)


def rows(configs: list[dict], batch: int, seq: int, methods: list[str]) -> list[dict]:
    out = []
    for config in configs:
        fb = peak_child(config, batch, seq, "fb")
        row = dict(config=config, fb_mb=fb / 2**20)
        for m in methods:
            row[f"{m}_whole"] = peak_child(config, batch, seq, "whole", m) / fb
            row[f"{m}_blocks"] = peak_child(config, batch, seq, "blocks", m) / fb
        out.append(row)
        cells = "  ".join(f"{m} whole {row[m + '_whole']:.2f}x blocks {row[m + '_blocks']:.2f}x" for m in methods)
        print(f"hidden {config['hidden_size']:4d} layers {config['num_hidden_layers']:2d}  fwd+bwd "
              f"{row['fb_mb']:7.1f} MB  {cells}", flush=True)
    return out


def extrapolate(row: dict, batch: int, seq: int, method: str) -> dict:
    """The 7B estimate from one measured row (bytes per activation element of one layer's scoring pass)."""
    c = row["config"]
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    fb_bytes = row["fb_mb"] * 2**20
    blocks = row[f"{method}_blocks"] * fb_bytes
    recorded = (L + 1) * batch * seq * h * 4
    head = batch * seq * c["vocab_size"] * 4 * 3  # logits, their softmax and gradient
    per_element = max(blocks - recorded - head, 0) / layer_elements(h, i, c["num_attention_heads"],
                                                                   c["num_key_value_heads"], batch, seq)
    b7, t7, s7 = 1, 2048, 2  # batch, tokens, bytes (bfloat16)
    g = LLAMA_7B
    layer = per_element / 4 * s7 * layer_elements(g["hidden_size"], g["intermediate_size"], g["num_attention_heads"],
                                                  g["num_key_value_heads"], b7, t7)
    rec = (g["num_hidden_layers"] + 1) * b7 * t7 * g["hidden_size"] * s7
    head7 = b7 * t7 * g["vocab_size"] * 4 * 3
    weights = 6.74e9 * s7
    return dict(per_element_bytes=per_element, layer_gb=layer / 1e9, recorded_gb=rec / 1e9, head_gb=head7 / 1e9,
                weights_gb=weights / 1e9, total_gb=(layer + rec + head7 + weights) / 1e9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    hidden, depths, batch, seq = (64, [2, 4], 2, 32) if a.quick else (256, [4, 8, 16], 4, 128)
    configs = [dict(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=d,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=259) for d in depths]
    methods = ["jacobian", "oba"]
    print(f"peak memory / one forward+backward, batch {batch} x {seq} tokens, 1 thread")
    data = rows(configs, batch, seq, methods)
    est = extrapolate(data[-1], batch, seq, "oba")
    print(f"7B-shaped Llama (hidden 4096, 32 layers, bf16, 1 x 2048 tokens), oba block by block, extrapolated from "
          f"{est['per_element_bytes']:.1f} bytes per float32 activation element of one measured layer: one layer's "
          f"pass {est['layer_gb']:.1f} GB + recorded hidden states {est['recorded_gb']:.2f} GB + head "
          f"{est['head_gb']:.2f} GB + weights {est['weights_gb']:.1f} GB = {est['total_gb']:.1f} GB")
    if a.json:
        a.json.write_text(json.dumps(dict(rows=data, estimate_7b=est), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
