"""How good is each criterion? ResNet-20 trained on the UCI digits, every method side by side.

For each criterion:
* Spearman correlation of its channel scores with the oracle (the measured loss change of removing
  each single channel structure), over all structures ("global") and averaged within groups
  ("per group": what local pruning uses; it ignores the per-group normalisation some criteria apply);
* test accuracy after removing (zeroing) the lowest-scored 10% and 20% of the channels of every group,
  without fine-tuning;
* test accuracy after physically removing 50% of every group's channels and a short fine-tuning.

Run (about 10-20 minutes on 2 CPU cores; the trained model is cached after the first run):
    python bench/quality.py                    # prints a Markdown table
    python bench/quality.py --json quality.json --finetune-epochs 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# label -> (method, options)
CRITERIA = {
    "magnitude": ("magnitude", {}),
    "taylor": ("taylor", {}),
    "obd": ("obd", {}),
    "jacobian": ("jacobian", {}),
    "jacobian (sample rows)": ("jacobian", {"rows": "sample"}),
    "oba": ("oba", {}),
    "oba (full Hessian)": ("oba", {"hessian": "full"}),
    "sosp-h": ("sosp-h", {}),
    "sosp-i": ("sosp-i", {}),
    "ec (structured)": ("ec", {}),
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        # average the ranks of tied values
        uniq, inverse = torch.unique(x, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), help="labels to run")
    parser.add_argument("--batches", type=int, default=8, help="training batches (of 64) to score on")
    parser.add_argument("--oracle-samples", type=int, default=512, help="training samples for the oracle")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    import pyobc
    from pyobc import datasets, models
    from pyobc.masking import lowest_channels, zero_channels

    torch.manual_seed(0)
    model = models.trained("resnet20", image_size=16, channels=1)
    train = datasets.digits("train", batch_size=64, image_size=16, channels=1, shuffle=False)
    test = datasets.digits("test", batch_size=256, image_size=16, channels=1)
    xo, yo = datasets.digits_tensors("train", image_size=16, channels=1)
    oracle_data = [(xo[i:i + 256], yo[i:i + 256]) for i in range(0, args.oracle_samples, 256)]
    base_acc = models.evaluate(model, test)
    print(f"ResNet-20 on digits 16x16: test accuracy {base_acc:.2%}", file=sys.stderr)

    t0 = time.perf_counter()
    oracle = pyobc.score(model, oracle_data, "oracle")
    print(f"oracle: {len(oracle.ranking())} structures in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    oracle_all = torch.cat(oracle.values)

    rows = []
    for label in args.criteria:
        method, options = CRITERIA[label]
        if method not in pyobc.methods():
            print(f"skipping {label}: method not available", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        scores = pyobc.score(model, train, method, max_batches=args.batches, **options)
        seconds = time.perf_counter() - t0
        allv = torch.cat(scores.values)
        per_group = [spearman(v, o) for v, o in zip(scores.values, oracle.values) if v.numel() > 2]
        row = {"criterion": label, "seconds": seconds,
               "spearman_global": spearman(allv, oracle_all),
               "spearman_per_group": sum(per_group) / len(per_group)}
        for frac in (0.1, 0.2):
            pruned = zero_channels(model, scores.groups, lowest_channels(scores.values, scores.groups, frac))
            row[f"acc_{int(frac * 100)}"] = models.evaluate(pruned, test)
        if hasattr(pyobc, "prune"):
            small, _ = pyobc.prune(model, scores, 0.5, scope="local")
            finetune = datasets.digits("train", batch_size=64, image_size=16, channels=1, seed=1)
            models.train(small, finetune, epochs=args.finetune_epochs, lr=0.02, weight_decay=5e-4)
            row["acc_50_ft"] = models.evaluate(small, test)
        rows.append(row)
        print(f"{label}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})}",
              file=sys.stderr)

    print(f"\nResNet-20 on UCI digits (16x16), unpruned test accuracy {base_acc:.2%}; scores from "
          f"{args.batches} batches of 64; oracle over {args.oracle_samples} training samples.\n")
    print("| criterion | Spearman vs oracle (global) | Spearman (per group) | acc, 10% removed | "
          "acc, 20% removed | acc, 50% removed + fine-tuning | scoring time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ft = f"{r['acc_50_ft']:.2%}" if "acc_50_ft" in r else "n/a"
        print(f"| {r['criterion']} | {r['spearman_global']:.3f} | {r['spearman_per_group']:.3f} | "
              f"{r['acc_10']:.2%} | {r['acc_20']:.2%} | {ft} | {r['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base_accuracy": base_acc, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
