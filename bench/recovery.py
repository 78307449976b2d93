"""Recovery after pruning on ResNet-20 trained on digits (16x16, 1 channel).

1. 50% of the channels removed (jacobian scores, global ranking), then the same short fine-tuning for
   (a) naive pruning and (b) Equivalent Pruning (C/D adapters, folded afterwards): test accuracy, mean
   over seeds (the seed sets the fine-tuning batch order).
2. Elimination-compensation sparsification at 50/70/90% (global threshold, no fine-tuning), with and
   without the bias compensation: the model as trained (its convs have no bias, so only the classifier
   can be compensated) and the same model with zero biases added to every conv (pyobc.pruning.add_biases).

Prints Markdown tables. Usage::

    python bench/recovery.py                 # about 5 minutes on 2 shared CPU cores
    python bench/recovery.py --seeds 1 --epochs 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pyobc
from pyobc.pruning import add_biases


def test_loss(model, loader) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            n += int(y.numel())
    return total / n


def fmt(values) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed")
    ap.add_argument("--epochs", default="1,3", help="fine-tuning budgets (epochs), comma-separated")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--adapter-lr", type=float, default=None, help="learning rate of C and D (default: --lr)")
    ap.add_argument("--adapter-weight-decay", type=float, default=0.0)
    ap.add_argument("--score-batches", type=int, default=10)
    ap.add_argument("--ec-batches", type=int, default=4)
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    epochs = [int(e) for e in args.epochs.split(",")]
    adapter_lr = args.lr if args.adapter_lr is None else args.adapter_lr
    t0 = time.perf_counter()

    model = pyobc.models.trained("resnet20", image_size=16, channels=1)
    test = pyobc.datasets.digits("test", batch_size=256, image_size=16)
    score_data = pyobc.datasets.digits("train", batch_size=64, image_size=16, seed=1234)
    base_acc = pyobc.models.evaluate(model, test)
    x = next(iter(score_data))[0][:2]

    # -- 1. naive vs equivalent pruning ------------------------------------------------------------------
    scores = pyobc.score(model, score_data, "jacobian", max_batches=args.score_batches)
    naive0, report = pyobc.prune(model, scores, args.ratio, example_inputs=x)
    adapted0 = pyobc.equivalent_prune(model, scores, args.ratio, example_inputs=x)
    acc_pruned = pyobc.models.evaluate(naive0, test)
    acc_adapted0 = pyobc.models.evaluate(adapted0, test)
    assert abs(acc_pruned - acc_adapted0) < 1e-9, "adapters at initialisation must equal naive pruning"
    results: dict[tuple[str, int], list[float]] = {}
    for e in epochs:
        for seed in range(args.seeds):
            loader = pyobc.datasets.digits("train", batch_size=64, image_size=16, seed=seed)
            naive, _ = pyobc.prune(model, scores, args.ratio)
            torch.manual_seed(seed)
            pyobc.models.train(naive, loader, e, args.lr, weight_decay=args.weight_decay, progress=False)
            results.setdefault(("naive", e), []).append(pyobc.models.evaluate(naive, test))

            loader = pyobc.datasets.digits("train", batch_size=64, image_size=16, seed=seed)
            adapted = pyobc.equivalent_prune(model, scores, args.ratio, example_inputs=x)
            extra = pyobc.adapter_parameters(adapted)
            base = [p for p in adapted.parameters() if all(p is not q for q in extra)]
            groups = [{"params": [p for p in base if p.ndim >= 2], "weight_decay": args.weight_decay},
                      {"params": [p for p in base if p.ndim < 2], "weight_decay": 0.0},
                      {"params": extra, "lr": adapter_lr, "weight_decay": args.adapter_weight_decay}]
            torch.manual_seed(seed)
            pyobc.models.train(adapted, loader, e, args.lr, param_groups=groups, progress=False)
            folded = pyobc.fold(adapted)
            acc_a, acc_f = pyobc.models.evaluate(adapted, test), pyobc.models.evaluate(folded, test)
            if abs(acc_a - acc_f) > 1.5 / 359:
                print(f"warning: folded accuracy {acc_f} differs from the adapter model's {acc_a}")
            results.setdefault(("equivalent", e), []).append(acc_f)
    t1 = time.perf_counter()

    print(f"## ResNet-20 on digits (16x16): {args.ratio:.0%} of channels removed, jacobian scores "
          f"({args.score_batches} batches), global ranking\n")
    print(f"Unpruned test accuracy {100 * base_acc:.2f}%; params {report.params_before} -> {report.params_after}, "
          f"MACs/sample {report.macs_before} -> {report.macs_after}; accuracy right after pruning "
          f"{100 * acc_pruned:.2f}% (naive and adapters at initialisation agree).\n")
    print(f"Fine-tuning: SGD (Nesterov, momentum 0.9), lr {args.lr} cosine, weight decay {args.weight_decay}, "
          f"batch 64; adapters C, D: lr {adapter_lr}, weight decay {args.adapter_weight_decay}. "
          f"Test accuracy (%), mean ± std over {args.seeds} seed(s):\n")
    print("| fine-tuning epochs | (a) naive pruning + fine-tuning | (b) Equivalent Pruning + fine-tuning, folded |")
    print("|---:|---:|---:|")
    for e in epochs:
        print(f"| {e} | {fmt(results[('naive', e)])} | {fmt(results[('equivalent', e)])} |")

    # -- 2. EC sparsification ----------------------------------------------------------------------------
    sparsities = [float(s) for s in args.sparsities.split(",")]
    ec_data = [b for _, b in zip(range(args.ec_batches), score_data)]
    rows = []
    for label, net in (("as trained (conv bias-free)", model), ("zero conv biases added", add_biases(model))):
        s = pyobc.score(net, ec_data, "ec", granularity="weight")
        for sp in sparsities:
            with_c = pyobc.sparsify(net, s, sp, compensate=True)
            without = pyobc.sparsify(net, s, sp, compensate=False)
            rows.append((label, sp, pyobc.models.evaluate(with_c, test), pyobc.models.evaluate(without, test),
                         test_loss(with_c, test), test_loss(without, test)))
    print(f"\n## EC sparsification of ResNet-20 (ec, Gauss-Newton curvature, {args.ec_batches} batches of 64, "
          "global threshold over conv/linear weights, no fine-tuning)\n")
    print("| model | sparsity | acc. compensated | acc. not compensated | loss compensated | loss not compensated |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, sp, ac, an, lc, ln in rows:
        print(f"| {label} | {sp:.0%} | {100 * ac:.2f} | {100 * an:.2f} | {lc:.4f} | {ln:.4f} |")
    print(f"\n(fine-tuning part {t1 - t0:.0f} s, total {time.perf_counter() - t0:.0f} s, "
          f"{args.threads} thread(s))")


if __name__ == "__main__":
    main()
