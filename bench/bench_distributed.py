"""Data-parallel scoring throughput: samples/s of ``pyobc.score`` with 1 and 2 processes on CPU (Gloo).

Each configuration is one ``python -m torch.distributed.run --standalone --nproc_per_node=P`` job of this
script in worker mode. Every process uses ``--threads`` intra-op threads (1 by default, so that 2
processes on 2 cores compare fairly with 1 process on 1 core). In the worker, every rank scores its
shard (``pyobc.distributed.sharded_loader``) once untimed (warm-up: lazy imports, allocator), then
``--repeats`` timed times between barriers; the time of a call covers everything ``pyobc.score`` does
(tracing the groups, the batch loop, the consistency check and the all-reduce, finalising). Throughput
= total samples / median time. Process start-up is not counted.

Also reported: CPU seconds of one call summed over the ranks (``time.process_time``), and the CPU
efficiency = 1-process CPU seconds / P-process CPU seconds. On a machine shared with other jobs the
wall-clock speed-up depends on how many cores are actually free; the CPU efficiency does not, and says
what data parallelism costs on top of the work itself (every rank traces the model's groups, plus the
gather and all-reduce): with P free cores the speed-up is about P x that efficiency.

Run:
    python bench/bench_distributed.py                               # ResNet-20, jacobian and oba, 1 and 2 processes
    python bench/bench_distributed.py --samples 512 --batch 32 --methods jacobian oba obd --nproc 1 2 4
    python bench/bench_distributed.py --threaded-baseline           # also 1 process with P threads
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


def _dataset(n: int, size: int):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))


def worker(args) -> None:
    import torch.distributed as dist
    import pyobc

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same weights on every rank
    model = pyobc.models.get(args.model, num_classes=10, in_channels=3, input_size=args.size).eval()
    ds = _dataset(args.samples, args.size)
    for method in args.methods:
        loader = pyobc.distributed.sharded_loader(ds, args.batch)
        times, cpu = [], []
        for i in range(args.repeats + 1):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            s = pyobc.score(model, loader, method)
            c1 = time.process_time()
            dist.barrier()
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - t0)
                cpu.append(c1 - c0)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, statistics.median(cpu))
        if rank == 0:
            t = statistics.median(times)
            print("RESULT " + json.dumps({
                "method": method, "processes": world, "threads": args.threads, "samples": s.samples,
                "batches": s.batches, "seconds": t, "samples_per_s": s.samples / t,
                "cpu_seconds": sum(per_rank)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--size", type=int, default=32, help="input image size")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=["jacobian", "oba"])
    p.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threaded-baseline", action="store_true",
                   help="also 1 process with max(--nproc) x --threads threads")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    configs = [(n, args.threads) for n in args.nproc]
    if args.threaded_baseline:
        configs.append((1, max(args.nproc) * args.threads))
    rows = []
    for nproc, threads in configs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", "--model", args.model, "--size", str(args.size), "--samples",
               str(args.samples), "--batch", str(args.batch), "--threads", str(threads), "--repeats",
               str(args.repeats), "--methods", *args.methods]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        rows += [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    print(f"{args.model}, {args.samples} samples, batch {args.batch} per rank, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'method':<10} {'processes':>9} {'threads':>7} {'seconds':>8} {'samples/s':>10} {'speed-up':>8} "
          f"{'CPU s':>7} {'CPU eff.':>8}")
    base = {r["method"]: r for r in rows if r["processes"] == 1 and r["threads"] == args.threads}
    for r in rows:
        b = base[r["method"]]
        print(f"{r['method']:<10} {r['processes']:>9} {r['threads']:>7} {r['seconds']:>8.2f} "
              f"{r['samples_per_s']:>10.1f} {r['samples_per_s'] / b['samples_per_s']:>7.2f}x "
              f"{r['cpu_seconds']:>7.2f} {b['cpu_seconds'] / r['cpu_seconds']:>7.2f}x")


if __name__ == "__main__":
    main()
