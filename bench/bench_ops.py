"""Benchmarks of the pyobc ops against the eager PyTorch expressions they replace.

    pytest bench/bench_ops.py --benchmark-only      # pytest-benchmark, op and eager side by side
    python bench/bench_ops.py [--threads N] [--reps R] [--only SUBSTR]   # tables (see below)

Script mode prints three tables:

1. Every op vs its eager expression on large (activation-sized) and small inputs: medians and the
   eager/op ratio. Targets: >= 1.5x for the reductions (channel_dot, weight_channel_sums,
   csr_gather_sum) on activation-sized inputs, >= 1x for gather_channels.
   - channel ops: eager materialises ``a * b`` (a full-size temporary) and then reduces it;
   - csr_gather_sum: eager is ``zeros.index_add_(-1, row, values.index_select(-1, col))``;
   - gather_channels: eager is ``[t.index_select(d, i) for ...]`` (one op per tensor).
2. Layout of ResNet-56 (``pyobc.models.resnet56()``, groups from ``build_groups(model,
   torch.randn(2, 3, 32, 32))``): sources -> member channels and member channels -> group channels
   done three ways: one CSR call (what Layout does), the entry-list form index_select + index_add
   (what Layout did before), and a Python loop over groups / members / parameter slices. For each:
   the number of ops that reach a backend (on a GPU each is a kernel launch; counted with a
   TorchDispatchMode) and the time, for 1 row and for 64 rows (per-sample histories).
3. (CUDA only) achieved GB/s of each op on tensors >= 64 MB against the device's memory bandwidth
   (theoretical peak when torch reports clock and bus width, else a measured device copy).

Both sides of a comparison are timed in the same process, interleaved, so machine noise hits both
alike; on a shared 2-core machine, read the ratios rather than the absolute times.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyobc.ops as ops
from pyobc.ops import reference


def _act(shape, layout="contiguous", device="cpu"):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen).to(device)
    b = torch.randn(shape, generator=gen).to(device)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    return a, b


def _eager_weight_sums(w, t, groups):
    p = w * t
    out_ch, in_pg = w.shape[:2]
    out_sums = p.sum(tuple(range(1, w.dim())))
    in_sums = p.reshape(groups, out_ch // groups, in_pg, -1).sum((1, 3)).reshape(-1)
    return out_sums, in_sums


def _random_csr(n_rows, n_cols, per_row, device="cpu", seed=0):
    """A map where each of n_rows outputs sums 1..2*per_row random inputs (sorted columns)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 2 * per_row + 1, (n_rows,), generator=gen)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    col = torch.randint(0, n_cols, (int(rowptr[-1]),), generator=gen)
    return rowptr.to(device), col.to(device)


def _eager_csr_sum(values, rowptr, col, row_of, weight=None):
    x = values.index_select(-1, col)
    if weight is not None:
        x = x * weight
    out = values.new_zeros(values.shape[:-1] + (rowptr.numel() - 1,))
    return out.index_add_(-1, row_of, x)


def _row_of(rowptr, nnz):
    return torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=rowptr.device),
                                   rowptr.diff(), output_size=nnz)


def cases(device="cpu"):
    """name -> builder of (inputs, op, eager); lazy, so that pytest collection stays cheap."""
    def act(shape, dim, per_sample, layout="contiguous"):
        def build():
            a, b = _act(shape, layout, device)
            keep = {dim % len(shape), 0} if per_sample else {dim % len(shape)}
            dims = tuple(d for d in range(len(shape)) if d not in keep)
            return ((a, b),
                    lambda a, b: ops.channel_dot(a, b, dim, per_sample),
                    lambda a, b: (a * b).sum(dims))
        return build

    def scale(shape, backward=False):
        """channel_scale vs the broadcast multiply; with backward, the gated product's gradients:
        (g * s, sum of g * x per channel) as (channel_scale, channel_dot) vs eager mul and sum."""
        def build():
            x, g = _act(shape, device=device)
            s = torch.randn(shape[1], generator=torch.Generator().manual_seed(2)).to(device)
            view = (1, -1) + (1,) * (len(shape) - 2)
            dims = tuple(d for d in range(len(shape)) if d != 1)
            if backward:
                return ((x, g, s),
                        lambda x, g, s: (ops.channel_scale(g, s, 1), ops.channel_dot(g, x, 1)),
                        lambda x, g, s: (g * s.view(view), (g * x).sum(dims)))
            return ((x, s), lambda x, s: ops.channel_scale(x, s, 1), lambda x, s: x * s.view(view))
        return build

    def weights(shape, groups):
        def build():
            w, t = _act(shape, device=device)
            return ((w, t),
                    lambda w, t: ops.weight_channel_sums(w, t, groups),
                    lambda w, t: _eager_weight_sums(w, t, groups))
        return build

    def sq_sums(n, c, hw, stride=1):
        """conv2d_sq_grad_sums (3x3, padding 1) vs the reference's grouped weight-gradient convolution
        in chunks of samples (``reference.sq_chunk_samples``: what OBD runs where the op is not routed)."""
        def build():
            gen = torch.Generator().manual_seed(3)
            co, ho = c * stride, (hw - 1) // stride + 1
            x = torch.randn(n, c, hw, hw, generator=gen).to(device)
            g = torch.randn(n, co, ho, ho, generator=gen).to(device)
            conv = ((3, 3), (stride, stride), (1, 1), (1, 1))
            return ((x, g), lambda x, g: ops.conv2d_sq_grad_sums(x, g, *conv),
                    lambda x, g: reference.conv2d_sq_grad_sums(x, g, *conv))
        return build

    def csr(rows, n_cols, n_out, per_row, weighted=False):
        def build():
            gen = torch.Generator().manual_seed(1)
            shape = (n_cols,) if rows is None else (rows, n_cols)
            values = torch.randn(shape, generator=gen).to(device)
            rowptr, col = _random_csr(n_out, n_cols, per_row, device)
            weight = torch.randn(col.numel(), generator=gen).to(device) if weighted else None
            row_of = _row_of(rowptr, col.numel())
            return ((values,),
                    lambda v: ops.csr_gather_sum(v, rowptr, col, weight, check=False),
                    lambda v: _eager_csr_sum(v, rowptr, col, row_of, weight))
        return build

    def gather(specs):
        """specs: (shape, dim, keep fraction) per tensor."""
        def build():
            gen = torch.Generator().manual_seed(2)
            tensors, dims, idx = [], [], []
            for shape, dim, keep in specs:
                tensors.append(torch.randn(shape, generator=gen).to(device))
                dims.append(dim)
                n = shape[dim]
                idx.append(torch.randperm(n, generator=gen)[:max(1, int(n * keep))].sort()
                           .values.to(device))
            return ((tensors,),
                    lambda ts: ops.gather_channels(ts, dims, idx),
                    lambda ts: [t.index_select(d, i) for t, d, i in zip(ts, dims, idx)])
        return build

    # every parameter of a ResNet-56-sized net pruned to half its out-channels (dim 0)
    resnet56_params = ([((16, 3, 3, 3), 0, 0.5)] + [((16, 16, 3, 3), 0, 0.5)] * 18
                       + [((32, 32, 3, 3), 0, 0.5)] * 18 + [((64, 64, 3, 3), 0, 0.5)] * 18
                       + [((c,), 0, 0.5) for c in [16] * 19 + [32] * 18 + [64] * 18] * 4)
    return {
        "act 64x64x32x32 dim=1": act((64, 64, 32, 32), 1, False),
        "act 64x64x32x32 dim=1 per_sample": act((64, 64, 32, 32), 1, True),
        "act 64x64x32x32 channels_last per_sample": act((64, 64, 32, 32), 1, True,
                                                        "channels_last"),
        "tokens 64x197x192 dim=-1": act((64, 197, 192), -1, False),
        "tokens 64x197x192 dim=-1 per_sample": act((64, 197, 192), -1, True),
        "act small 8x16x8x8 dim=1": act((8, 16, 8, 8), 1, False),
        "channel_scale act 64x64x32x32 dim=1": scale((64, 64, 32, 32)),
        "channel_scale act 64x64x32x32 gate gradients (scale + dot)": scale((64, 64, 32, 32), True),
        "weight 512x256x3x3 groups=1": weights((512, 256, 3, 3), 1),
        "weight 512x256x3x3 groups=4": weights((512, 256, 3, 3), 4),
        "weight 512x1x3x3 depthwise": weights((512, 1, 3, 3), 512),
        "weight small 16x16x3x3": weights((16, 16, 3, 3), 1),
        "conv2d_sq_grad_sums 64x64x8x8 (ResNet-20 stage 3)": sq_sums(64, 64, 8),
        "conv2d_sq_grad_sums 64x128x4x4": sq_sums(64, 128, 4),
        "conv2d_sq_grad_sums 64x32x16x16 stride 2": sq_sums(64, 32, 16, 2),
        "conv2d_sq_grad_sums 32x512x7x7 (ResNet-50 stage 4)": sq_sums(32, 512, 7),
        "conv2d_sq_grad_sums 64x16x32x32 (not routed: chunks win)": sq_sums(64, 16, 32),
        "csr 256 rows x 64k -> 16k (2/out)": csr(256, 65536, 16384, 2),
        "csr 256 rows x 64k -> 4k (8/out) weighted": csr(256, 65536, 4096, 8, weighted=True),
        "csr 1 row 8k -> 6k (members-like)": csr(None, 8464, 6336, 1),
        "gather 512x512x3x3 dim=1 keep 1/2": gather([((512, 512, 3, 3), 1, 0.5)]),
        "gather 512x512x3x3 dim=0 keep 1/2": gather([((512, 512, 3, 3), 0, 0.5)]),
        "gather resnet56-sized net, 451 tensors": gather(resnet56_params),
        "gather small 64x16x3x3 + bias": gather([((64, 16, 3, 3), 0, 0.5), ((64,), 0, 0.5)]),
    }


# ----------------------------------------------------------------------------------------------
# ResNet-56 Layout: one CSR call vs index_select/index_add vs a Python loop
# ----------------------------------------------------------------------------------------------

class CountOps(TorchDispatchMode):
    """Counts the ops that run a kernel (views excluded): one launch each on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def build_layout_benchmark():
    """ResNet-56's Layout and, per level, the three ways of computing it."""
    import pyobc
    from pyobc.grouping import build_groups
    from pyobc.scoring.layout import Layout, _norm_axis
    torch.manual_seed(0)
    model = pyobc.models.resnet56()
    groups = build_groups(model, torch.randn(2, 3, 32, 32))
    params = dict(model.named_parameters())
    lay = Layout(groups, params)

    # per parameter slice of every member: (member positions, source positions)
    plan = []
    for g, offs in zip(lay.groups, lay.member_offsets):
        for m, moff in zip(g.members, offs):
            for sl in m.slices:
                axis, _ = _norm_axis(sl.axis, params[sl.param].dim(), sl.groups)
                src0 = lay.source_offsets[("param", sl.param, axis)]
                plan.append((moff + sl.root, src0 + sl.index))

    def members_loop(x):  # one index_select + index_add per (member, parameter slice)
        out = x.new_zeros(x.shape[:-1] + (lay.num_members,))
        for dst, src in plan:
            out.index_add_(-1, dst, x.index_select(-1, src))
        return out

    def group_sum_loop(m):  # one add per member
        out = m.new_zeros(m.shape[:-1] + (lay.num_channels,))
        for g, offs, goff in zip(lay.groups, lay.member_offsets, lay.group_offsets):
            for moff in offs:
                out[..., goff:goff + g.size] += m[..., moff:moff + g.size]
        return out

    def members_old(x):
        out = x.new_zeros(x.shape[:-1] + (lay.num_members,))
        return out.index_add_(-1, lay.dst, x.index_select(-1, lay.src))

    def group_sum_old(m):
        return m.new_zeros(m.shape[:-1] + (lay.num_channels,)).index_add_(-1, lay.member_group, m)

    ways = {
        "sources -> members": {"CSR (1 call)": lay.members,
                               "index_select+index_add": members_old,
                               "Python loop": members_loop},
        "members -> groups": {"CSR (1 call)": lay.group_sum,
                              "index_select+index_add": group_sum_old,
                              "Python loop": group_sum_loop},
    }
    return lay, ways


def _time(fn, inputs, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn(*inputs)
    return (time.perf_counter() - start) / calls


def _median_pair(fa, fb, inputs, reps, min_time):
    calls = max(1, int(min_time / max(_time(fa, inputs, 1), _time(fb, inputs, 1), 1e-6)))
    ta, tb = [], []
    for _ in range(reps):  # interleaved
        ta.append(_time(fa, inputs, calls))
        tb.append(_time(fb, inputs, calls))
    return statistics.median(ta), statistics.median(tb)


def run(reps: int = 15, min_time: float = 0.05, only: str | None = None,
        device: str = "cpu") -> list[tuple[str, float, float]]:
    rows = []
    for name, build in cases(device).items():
        if only and only not in name:
            continue
        inputs, op, eager = build()
        # check before timing: same numbers
        for x, y in zip(torch.utils._pytree.tree_leaves(op(*inputs)),
                        torch.utils._pytree.tree_leaves(eager(*inputs))):
            torch.testing.assert_close(x, y.to(x.dtype), rtol=1e-3, atol=1e-2)
        t_eager, t_op = _median_pair(eager, op, inputs, reps, min_time)
        rows.append((name, t_eager, t_op))
    return rows


def run_layout(reps: int = 9, min_time: float = 0.05):
    lay, ways = build_layout_benchmark()
    out = []
    for level, fns in ways.items():
        n_in = lay.num_sources if level.startswith("sources") else lay.num_members
        for rows in (None, 64):
            shape = (n_in,) if rows is None else (rows, n_in)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
            ref = fns["index_select+index_add"](x)
            for way, fn in fns.items():
                torch.testing.assert_close(fn(x), ref, rtol=1e-5, atol=1e-5)
                with CountOps() as counter:
                    fn(x)
                calls = max(1, int(min_time / max(_time(fn, (x,), 1), 1e-6)))
                t = statistics.median(_time(fn, (x,), calls) for _ in range(reps))
                out.append((level, "1 row" if rows is None else f"{rows} rows", way,
                            counter.count, t))
    return lay, out


# ----------------------------------------------------------------------------------------------
# CUDA bandwidth
# ----------------------------------------------------------------------------------------------

def device_bandwidth_gbs() -> tuple[float, str]:
    props = torch.cuda.get_device_properties(0)
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    bus = getattr(props, "memory_bus_width", 0)     # bits
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8 / 1e9, "theoretical (2 x clock x bus width)"
    x = torch.empty(1 << 28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - start) / 1e9, "measured device copy"


def cuda_gbs_cases():
    """name -> builder of (fn, bytes moved); every input >= 64 MB."""
    dev = "cuda"

    def cd(shape, dim, ps):
        a, b = _act(shape, device=dev)
        return (lambda: ops.channel_dot(a, b, dim, ps)), 2 * a.numel() * a.element_size()

    def ws(shape, groups):
        w, t = _act(shape, device=dev)
        return (lambda: ops.weight_channel_sums(w, t, groups)), 2 * w.numel() * w.element_size()

    def cs(rows, n_cols, n_out, per_row):
        v = torch.randn(rows, n_cols, device=dev)
        rowptr, col = _random_csr(n_out, n_cols, per_row, dev)
        nnz = col.numel()
        moved = rows * nnz * 4 + rows * n_out * 4 + nnz * 8 + (n_out + 1) * 8  # gathers counted
        return (lambda: ops.csr_gather_sum(v, rowptr, col, check=False)), moved

    def gc(shape, dim, keep):
        t = torch.randn(shape, device=dev)
        idx = torch.randperm(shape[dim], device=dev)[:int(shape[dim] * keep)]
        out_bytes = t.numel() * keep * 4
        return (lambda: ops.gather_channels([t], [dim], [idx])), 2 * out_bytes

    return {
        "channel_dot 128x256x32x32 dim=1 (256 MB)": lambda: cd((128, 256, 32, 32), 1, False),
        "channel_dot 128x256x32x32 per_sample": lambda: cd((128, 256, 32, 32), 1, True),
        "channel_dot tokens 256x197x768 dim=-1": lambda: cd((256, 197, 768), -1, False),
        "weight_channel_sums 2048x1024x3x3": lambda: ws((2048, 1024, 3, 3), 1),
        "csr_gather_sum 64 rows x 1M -> 256k": lambda: cs(64, 1 << 20, 1 << 18, 2),
        "gather_channels 2048x1024x3x3 dim=0 1/2": lambda: gc((2048, 1024, 3, 3), 0, 0.5),
        "gather_channels 2048x1024x3x3 dim=1 1/2": lambda: gc((2048, 1024, 3, 3), 1, 0.5),
    }


def run_cuda_gbs(reps=20):
    peak, how = device_bandwidth_gbs()
    rows = []
    for name, build in cuda_gbs_cases().items():
        fn, moved = build()
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        t = statistics.median(times)
        rows.append((name, moved / 1e6, t * 1e3, moved / t / 1e9))
    return peak, how, rows


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("impl", ["op", "eager"])
    @pytest.mark.parametrize("case", list(cases()))
    def test_bench(benchmark, case, impl):
        inputs, op, eager = cases()[case]()
        fn = op if impl == "op" else eager
        benchmark.group = case
        benchmark.extra_info["threads"] = torch.get_num_threads()
        benchmark(fn, *inputs)

    @pytest.fixture(scope="module")
    def layout_ways_fixture():
        return build_layout_benchmark()

    @pytest.mark.parametrize("rows", [None, 64], ids=["1row", "64rows"])
    @pytest.mark.parametrize("way", ["CSR (1 call)", "index_select+index_add", "Python loop"])
    @pytest.mark.parametrize("level", ["sources -> members", "members -> groups"])
    def test_bench_resnet56_layout(benchmark, layout_ways_fixture, level, way, rows):
        lay, ways = layout_ways_fixture
        n_in = lay.num_sources if level.startswith("sources") else lay.num_members
        x = torch.randn((n_in,) if rows is None else (rows, n_in))
        with CountOps() as counter:
            ways[level][way](x)
        benchmark.group = f"resnet56 layout {level} {'1 row' if rows is None else '64 rows'}"
        benchmark.extra_info["ops (launches)"] = counter.count
        benchmark(ways[level][way], x)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    @pytest.mark.parametrize("case", list(cuda_gbs_cases()))
    def test_bench_cuda_gbs(benchmark, case):
        fn, moved = cuda_gbs_cases()[case]()

        def step():
            fn()
            torch.cuda.synchronize()

        benchmark.group = "cuda GB/s"
        benchmark.extra_info["bytes"] = moved
        benchmark(step)
        benchmark.extra_info["GB/s"] = moved / benchmark.stats.stats.median / 1e9


# ----------------------------------------------------------------------------------------------
# script mode
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--only", default=None, help="only op cases whose name contains this")
    parser.add_argument("--skip-layout", action="store_true", help="skip the ResNet-56 table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = ops.backend_report()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, pyobc ops: "
          f"{report['extension']['status']} (cpu: {report['ops']['channel_dot']['cpu']})")
    print(f"\n{'case':46s} {'eager ms':>9s} {'op ms':>9s} {'eager/op':>9s}")
    for name, t_eager, t_op in run(args.reps, only=args.only):
        print(f"{name:46s} {t_eager * 1e3:9.3f} {t_op * 1e3:9.3f} {t_eager / t_op:9.2f}")
    if not args.skip_layout:
        lay, rows = run_layout()
        print(f"\nResNet-56 layout: {len(lay.groups)} groups, {sum(len(g.members) for g in lay.groups)}"
              f" members, {lay.num_sources} sources -> {lay.num_members} member channels -> "
              f"{lay.num_channels} group channels")
        print(f"{'level':20s} {'rows':8s} {'way':24s} {'ops':>6s} {'ms':>9s}")
        for level, rws, way, count, t in rows:
            print(f"{level:20s} {rws:8s} {way:24s} {count:6d} {t * 1e3:9.3f}")
    if torch.cuda.is_available():
        peak, how, rows = run_cuda_gbs()
        print(f"\nCUDA {torch.cuda.get_device_name(0)}: memory bandwidth {peak:.0f} GB/s ({how})")
        print(f"{'case':46s} {'MB':>8s} {'ms':>8s} {'GB/s':>8s} {'% peak':>7s}")
        for name, mb, ms, gbs in rows:
            print(f"{name:46s} {mb:8.0f} {ms:8.3f} {gbs:8.0f} {100 * gbs / peak:6.0f}%")


if __name__ == "__main__":
    main()
