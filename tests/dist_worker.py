"""Worker for tests/test_distributed.py, launched with ``python -m torch.distributed.run --nproc_per_node=2``.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py MODE OUTDIR

Modes:
    equal     every case of CASES on this rank's shard (plus DDP, a process group, tiny all-reduce
              buckets, distributed=False and an unsharded loader); writes ``<label>.rank<r>.pt``
              (``Scores.save``) and ``warnings.rank<r>.json``
    mismatch  option, model, weight mismatches and a failure on one rank, each caught and recorded
              in ``errors.rank<r>.jsonl``; then mismatched methods, left uncaught (non-zero exit)
    empty     a dataset with fewer samples than ranks (rank 1's shard is empty), left uncaught

The model, data and cases live here so that the test can build the single-process reference from the
same definitions.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

BATCH = 5
DTYPE = torch.float64  # default dtype in the workers and for the parent's reference
#: (label, method, options, granularity)
CASES = [
    ("jacobian", "jacobian", {}, "channel"),
    ("jacobian-rows", "jacobian", {"rows": "sample"}, "channel"),
    ("obd", "obd", {}, "channel"),
    ("oba", "oba", {}, "channel"),
    ("oba-full-weight", "oba", {"hessian": "full"}, "weight"),
    ("taylor-weight", "taylor", {}, "weight"),
    ("magnitude", "magnitude", {}, "channel"),
    ("sosp-h", "sosp-h", {"micro_batch": 3}, "channel"),
    ("sosp-i", "sosp-i", {}, "channel"),
    ("ec-weight", "ec", {}, "weight"),
    ("oracle", "oracle", {}, "channel"),
]


class ResCNN(nn.Module):
    """stem+bn -> relu -> [c1+bn1 -> relu -> c2] + stem -> relu -> pool -> fc (a residual group)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c1, self.bn1 = nn.Conv2d(width, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, 3)
        with torch.no_grad():
            for bn in (self.bn, self.bn1):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.c2(F.relu(self.bn1(self.c1(h)))))
        return self.fc(h.mean((2, 3)))


def make_model(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return ResCNN(width).double().eval()


def make_dataset(n: int = 23) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=g))


def shard_batches(world: int = 2) -> list:
    """The batches every rank scores, rank 0's first: their union is what a single process scores."""
    import pyobc
    return [b for r in range(world) for b in pyobc.distributed.sharded_loader(make_dataset(), BATCH, num_replicas=world,
                                                                              rank=r)]


# ---------------------------------------------------------------------------------------------------


def _record(outdir: str, rank: int, scenario: str, fn) -> BaseException | None:
    """Run ``fn``; append what happened to errors.rank<r>.jsonl; wait for the other rank (so neither
    exits before both have written); return the exception, if any."""
    import torch.distributed as dist
    err = None
    try:
        fn()
        outcome = {"scenario": scenario, "type": None, "message": None}
    except Exception as e:  # noqa: BLE001 - recorded for the parent test
        err = e
        outcome = {"scenario": scenario, "type": type(e).__name__, "message": str(e),
                   "mro": [c.__name__ for c in type(e).__mro__]}
    with open(os.path.join(outdir, f"errors.rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(outcome) + "\n")
    dist.barrier()
    return err


def run_equal(outdir: str, rank: int, world: int) -> None:
    import torch.distributed as dist
    import pyobc
    from torch.nn.parallel import DistributedDataParallel as DDP

    ds = make_dataset()
    for label, method, options, granularity in CASES:
        loader = pyobc.distributed.sharded_loader(ds, BATCH)
        s = pyobc.score(make_model(), loader, method, granularity=granularity, **options)
        s.save(os.path.join(outdir, f"{label}.rank{rank}.pt"))
        if label == "oba":  # pruning with the combined scores gives the same model on every rank
            pruned, _ = pyobc.prune(make_model(), s, 0.5)
            torch.save(pruned.state_dict(), os.path.join(outdir, f"pruned.rank{rank}.pt"))
    # a DDP-wrapped model: the wrapped module is scored
    ddp = DDP(make_model())
    s = pyobc.score(ddp, pyobc.distributed.sharded_loader(ds, BATCH), "jacobian")
    s.save(os.path.join(outdir, f"ddp.rank{rank}.pt"))
    # an explicit process group
    group = dist.new_group(list(range(world)))
    s = pyobc.score(make_model(), pyobc.distributed.sharded_loader(ds, BATCH), "obd", distributed=group)
    s.save(os.path.join(outdir, f"group.rank{rank}.pt"))
    # tiny all-reduce buckets: many flat buckets, and tensors bigger than a bucket reduced alone
    saved, pyobc.distributed.BUCKET_BYTES = pyobc.distributed.BUCKET_BYTES, 200
    try:
        s = pyobc.score(make_model(), pyobc.distributed.sharded_loader(ds, BATCH), "oba", granularity="weight",
                        hessian="full")
    finally:
        pyobc.distributed.BUCKET_BYTES = saved
    s.save(os.path.join(outdir, f"buckets.rank{rank}.pt"))
    # opting out: every rank scores all the batches on its own
    s = pyobc.score(make_model(), shard_batches(world), "taylor", distributed=False)
    s.save(os.path.join(outdir, f"local.rank{rank}.pt"))
    # an unsharded loader: works, with a warning on rank 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyobc.score(make_model(), shard_batches(world), "jacobian")
    with open(os.path.join(outdir, f"warnings.rank{rank}.json"), "w") as f:
        json.dump([str(w.message) for w in caught], f)


def run_mismatch(outdir: str, rank: int, world: int) -> None:
    import pyobc

    ds = make_dataset()

    def loader():
        return pyobc.distributed.sharded_loader(ds, BATCH)

    _record(outdir, rank, "options", lambda: pyobc.score(make_model(), loader(), "oba", delta=0.1 * rank))
    _record(outdir, rank, "model", lambda: pyobc.score(make_model(width=4 + rank), loader(), "obd"))
    _record(outdir, rank, "weights", lambda: pyobc.score(make_model(seed=rank), loader(), "obd"))
    bad = {"bogus": 1} if rank == 1 else {}
    _record(outdir, rank, "failure", lambda: pyobc.score(make_model(), loader(), "obd", **bad))
    method = "jacobian" if rank == 0 else "obd"
    err = _record(outdir, rank, "method", lambda: pyobc.score(make_model(), loader(), method))
    if err is not None:
        raise err


def run_empty(outdir: str, rank: int, world: int) -> None:
    import pyobc

    loader = pyobc.distributed.sharded_loader(make_dataset(n=world - 1), BATCH)  # the last rank gets nothing
    err = _record(outdir, rank, "empty", lambda: pyobc.score(make_model(), loader, "jacobian"))
    if err is not None:
        raise err


def main() -> None:
    import torch.distributed as dist

    mode, outdir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.set_default_dtype(DTYPE)
    # a hang would surface as a Gloo timeout error instead of blocking until the parent's timeout
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        {"equal": run_equal, "mismatch": run_mismatch, "empty": run_empty}[mode](outdir, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
