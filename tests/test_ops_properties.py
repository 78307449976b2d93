"""Property tests (hypothesis) of every pyobc op: random shapes, dims (negative too), dtypes, empty
and non-contiguous inputs. Each example checks the op (compiled kernels when the extension is
loaded) against an independent float64 computation and against the pure-PyTorch reference kernel,
and bad inputs against clear errors.

The module runs itself a second time in a subprocess with ``PYOBC_DISABLE_EXT=1`` (the registered
reference kernels serve every op there), started when its first test runs so that it overlaps
with this process; ``test_reference_path_passes_the_same_properties`` waits for it.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pyobc.ops as ops
from pyobc.ops import reference as _reference

ROOT = Path(__file__).resolve().parents[1]
DISABLED = os.environ.get("PYOBC_DISABLE_EXT", "").strip() == "1"
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow], database=None)
# relative error bounds against float64, per input dtype (inputs are exactly representable)
REL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def reference_run():
    """This module again, in a PYOBC_DISABLE_EXT=1 interpreter (skipped when already disabled)."""
    if DISABLED:
        yield None
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(Path(__file__).relative_to(ROOT)), "-k", "not reference_path"],
        cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYOBC_DISABLE_EXT="1", OMP_NUM_THREADS="1"))
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_backend_is_what_the_environment_says():
    report = ops.backend_report()
    want = "reference" if DISABLED else "compiled"
    assert report["extension"]["status"] == ("disabled" if DISABLED else "loaded")
    assert all(info["cpu"] == want for info in report["ops"].values())


# ---------------------------------------------------------------------------------------------
# input builders
# ---------------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "channels_last"]


def rand(shape, dtype, layout, seed, low=-1.0, integers=False):
    """Values in [low, 1) rounded to a few bits, so that float16/bfloat16 hold them exactly; the
    requested memory layout (falls back to contiguous where it does not apply)."""
    gen = torch.Generator().manual_seed(seed)

    def base(*size):
        x = torch.rand(size, generator=gen, dtype=torch.float64) * (1 - low) + low
        x = torch.round(x * 16) / 16  # 5 significant bits at most
        if integers:
            return (x * 8).to(dtype)
        return x.to(dtype)

    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        return base(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        return base(*shape[:-1], 2 * shape[-1] + 1)[..., 1::2]
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        return base(1, *shape[1:]).expand(shape)
    if layout == "channels_last" and len(shape) == 4:
        return base(*shape).contiguous(memory_format=torch.channels_last)
    return base(*shape)


def check_close(got, want, dtype, scale):
    """got ~ want (float64) within REL[dtype] * scale (scale: sum of |terms| per output)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.double() - want).abs()
    bound = REL[dtype] * (scale + 1e-3)
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}"


def agree(got, ref, exact=False):
    """Op (compiled or registered reference) vs the reference kernel called directly."""
    for g, r in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)):
        assert g.dtype == r.dtype and g.shape == r.shape and g.is_contiguous()
        if exact or not g.dtype.is_floating_point:
            if g.dtype.is_floating_point:  # NaN == NaN here
                assert torch.equal(g.isnan(), r.isnan())
                g, r = g.nan_to_num(0.0), r.nan_to_num(0.0)
            assert torch.equal(g, r)
        else:
            tol = 1e-6 if g.dtype in (torch.float32, torch.float64) else 1e-2
            torch.testing.assert_close(g, r, rtol=tol, atol=tol, equal_nan=True)


shapes = st.lists(st.integers(0, 5), min_size=1, max_size=4)
dtypes = st.sampled_from(FLOATS)
layouts = st.sampled_from(LAYOUTS)


# ---------------------------------------------------------------------------------------------
# channel_dot and weight_channel_sums
# ---------------------------------------------------------------------------------------------

@st.composite
def shape_and_dim(draw):
    shape = draw(shapes)
    nd = len(shape)
    dim = draw(st.integers(-nd, nd - 1))
    per_sample = nd >= 2 and dim % nd != 0 and draw(st.booleans())
    return shape, dim, per_sample


@SETTINGS
@given(case=shape_and_dim(), dtype=dtypes, layout=layouts, seed=st.integers(0, 1000))
def test_channel_scale(case, dtype, layout, seed):
    """channel_scale is exact (one rounding of the float64 product) on every path, and its gradient
    with respect to the scale is channel_dot's value."""
    shape, dim, per_sample = case
    x = rand(shape, dtype, layout, seed)
    d = dim % len(shape)
    s = rand((shape[0], shape[d]) if per_sample else (shape[d],), dtype, "contiguous", seed + 1)
    view = [1] * len(shape)
    view[d] = shape[d]
    if per_sample:
        view[0] = shape[0]
    want = (x.double() * s.double().reshape(view)).to(dtype)
    got = ops.channel_scale(x, s, dim, per_sample)
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.equal(_reference.channel_scale(x, s, dim, per_sample).nan_to_num(0.0), want.nan_to_num(0.0))
    if dtype == torch.float64:
        leaf = s.clone().requires_grad_()
        g = rand(shape, dtype, "contiguous", seed + 2)
        grad, = torch.autograd.grad(ops.channel_scale(x, leaf, dim, per_sample), leaf, g)
        red = [i for i in range(len(shape)) if i not in ({d, 0} if per_sample else {d})]
        prod = g * x
        torch.testing.assert_close(grad, prod.sum(red) if red else prod, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(case=shape_and_dim(), dtype=dtypes, layout=layouts, same_layout=st.booleans(),
       seed=st.integers(0, 1000))
def test_channel_dot(case, dtype, layout, same_layout, seed):
    shape, dim, per_sample = case
    nd = len(shape)
    a = rand(shape, dtype, layout, seed)
    b = rand(shape, dtype, layout if same_layout else "contiguous", seed + 1)
    got = ops.channel_dot(a, b, dim, per_sample)
    d = dim % nd
    keep = {d, 0} if per_sample else {d}
    red = [i for i in range(nd) if i not in keep]
    prod = a.double() * b.double()
    want = prod.sum(red) if red else prod
    scale = prod.abs().sum(red) if red else prod.abs()
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_close(got, want, dtype, scale)
    agree(got, _reference.channel_dot(a, b, dim, per_sample))


@SETTINGS
@given(groups=st.integers(1, 3), out_per_group=st.integers(0, 3), in_per_group=st.integers(0, 4),
       kernel=st.lists(st.integers(0, 3), max_size=2), dtype=dtypes, layout=layouts,
       seed=st.integers(0, 1000))
def test_weight_channel_sums(groups, out_per_group, in_per_group, kernel, dtype, layout, seed):
    shape = (groups * out_per_group, in_per_group, *kernel)
    w = rand(shape, dtype, layout, seed)
    t = rand(shape, dtype, layout, seed + 1)
    out_sums, in_sums = ops.weight_channel_sums(w, t, groups)
    p = (w.double() * t.double()).reshape(shape[0], in_per_group, math.prod(kernel))
    per = p.sum(-1)
    absper = p.abs().sum(-1)
    want_in = per.reshape(groups, out_per_group, in_per_group).sum(1).reshape(-1)
    abs_in = absper.reshape(groups, out_per_group, in_per_group).sum(1).reshape(-1)
    check_close(out_sums, per.sum(1), dtype, absper.sum(1))
    check_close(in_sums, want_in, dtype, abs_in)
    agree((out_sums, in_sums), _reference.weight_channel_sums(w, t, groups))


# ---------------------------------------------------------------------------------------------
# csr_gather_sum and csr_gather_reduce
# ---------------------------------------------------------------------------------------------

@st.composite
def csr_maps(draw):
    n_cols = draw(st.integers(0, 7))
    counts = draw(st.lists(st.integers(0, 4 if n_cols else 0), max_size=6))
    nnz = sum(counts)
    col = draw(st.lists(st.integers(0, max(n_cols - 1, 0)), min_size=nnz, max_size=nnz))
    rowptr = torch.tensor([0] + counts, dtype=torch.long).cumsum(0)
    return n_cols, rowptr, torch.tensor(col, dtype=torch.long)


def expected_csr(values, rowptr, col, weight, reduce):
    """Loops over rows and entries in float64."""
    v = values.double()
    v = v.unsqueeze(0) if v.dim() == 1 else v
    n = rowptr.numel() - 1
    out = torch.zeros(v.shape[0], n, dtype=torch.float64)
    scale = torch.zeros_like(out)
    for r in range(v.shape[0]):
        for i in range(n):
            xs = [v[r, int(col[k])] * (1.0 if weight is None else float(weight[k]))
                  for k in range(int(rowptr[i]), int(rowptr[i + 1]))]
            xs = torch.stack(xs) if xs else torch.zeros(0, dtype=torch.float64)
            nz = int((xs != 0).sum())
            if reduce == "sum":
                out[r, i] = xs.sum()
            elif reduce == "amax":
                out[r, i] = xs.max() if xs.numel() else float("-inf")
            elif reduce == "count_nonzero":
                out[r, i] = nz
            else:
                out[r, i] = xs.sum() / max(nz, 1)
            scale[r, i] = xs.abs().sum() / (max(nz, 1) if reduce == "mean_nonzero" else 1)
    shape = values.shape[:-1] + (n,)
    return out.reshape(shape), scale.reshape(shape)


@SETTINGS
@given(maps=csr_maps(), rows=st.one_of(st.none(), st.integers(0, 11)), weighted=st.booleans(),
       dtype=dtypes, layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]),
       seed=st.integers(0, 1000))
def test_csr_gather_sum(maps, rows, weighted, dtype, layout, seed):
    n_cols, rowptr, col = maps
    shape = (n_cols,) if rows is None else (rows, n_cols)
    values = rand(shape, dtype, layout, seed)
    weight = rand((col.numel(),), dtype, "contiguous", seed + 1) if weighted else None
    got = ops.csr_gather_sum(values, rowptr, col, weight)
    assert got.dtype == dtype
    want, scale = expected_csr(values, rowptr, col, weight, "sum")
    check_close(got, want, dtype, scale)
    agree(got, _reference.csr_gather_sum(values, rowptr, col, weight))


@SETTINGS
@given(maps=csr_maps(), rows=st.one_of(st.none(), st.integers(0, 3)),
       reduce=st.sampled_from(["amax", "count_nonzero", "mean_nonzero"]), dtype=dtypes,
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), zeros=st.booleans(),
       nan=st.booleans(), seed=st.integers(0, 1000))
def test_csr_gather_reduce(maps, rows, reduce, dtype, layout, zeros, nan, seed):
    n_cols, rowptr, col = maps
    shape = (n_cols,) if rows is None else (rows, n_cols)
    values = rand(shape, dtype, layout, seed)
    if zeros:  # exact zeros (they matter for the *_nonzero reductions); strides kept
        values.mul_((rand(shape, torch.float32, layout, seed + 2, low=0.0) > 0.4).to(dtype))
    if nan and values.numel():
        values[(seed % values.shape[0],) + (0,) * (values.dim() - 1)] = float("nan")
    got = ops.csr_gather_reduce(values, rowptr, col, reduce)
    assert got.dtype == dtype
    want, scale = expected_csr(values, rowptr, col, None, reduce)
    finite = ~want.isnan()
    assert torch.equal(got.isnan(), want.isnan())  # NaN in -> NaN out, for every reduction
    if reduce == "mean_nonzero":
        check_close(got[finite], want[finite], dtype, scale[finite])
    else:  # amax and counts are exact
        assert torch.equal(got[finite].double(), want[finite])
    agree(got, _reference.csr_gather_reduce(values, rowptr, col, reduce),
          exact=reduce != "mean_nonzero")


# ---------------------------------------------------------------------------------------------
# gather_channels
# ---------------------------------------------------------------------------------------------

GATHER_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                 torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]


@st.composite
def gather_jobs(draw):
    jobs = []
    for _ in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
        nd = len(shape)
        dim = draw(st.integers(-nd, nd - 1))
        size = shape[dim]
        index = draw(st.lists(st.integers(0, size - 1), max_size=6)) if size else []
        jobs.append((shape, dim, index, draw(st.sampled_from(GATHER_DTYPES)),
                     draw(st.sampled_from(LAYOUTS))))
    return jobs


def make_any(shape, dtype, layout, seed):
    if dtype == torch.bool:
        return rand(shape, torch.float32, layout, seed) > 0
    if dtype == torch.complex64:
        return rand(shape, torch.float32, layout, seed) * (1 + 2j)  # keeps the layout
    if not dtype.is_floating_point:
        return rand(shape, dtype, layout, seed, low=-1.0 if dtype.is_signed else 0.0,
                    integers=True)
    return rand(shape, dtype, layout, seed)


@SETTINGS
@given(jobs=gather_jobs(), seed=st.integers(0, 1000))
def test_gather_channels(jobs, seed):
    tensors = [make_any(shape, dtype, layout, seed + i)
               for i, (shape, _, _, dtype, layout) in enumerate(jobs)]
    dims = [j[1] for j in jobs]
    indices = [torch.tensor(j[2], dtype=torch.long) for j in jobs]
    outs = ops.gather_channels(tensors, dims, indices)
    assert len(outs) == len(tensors)
    for t, d, idx, out in zip(tensors, dims, indices, outs):
        want = t.index_select(d, idx)
        assert out.dtype == t.dtype and out.is_contiguous() and out.shape == want.shape
        assert torch.equal(out, want)
        if out.numel():
            assert out.data_ptr() != t.data_ptr()  # a new tensor, never a view
    agree(outs, _reference.gather_channels(tensors, dims, indices), exact=True)


# ---------------------------------------------------------------------------------------------
# errors: bad input is an exception with a clear message, never a crash or a silent result
# ---------------------------------------------------------------------------------------------

ERRORS = (TypeError, ValueError, RuntimeError)


def raises(fn, pattern):
    """Both the public wrapper and the raw op raise, mentioning `pattern`."""
    with pytest.raises(ERRORS, match=pattern):
        fn()


@SETTINGS
@given(maps=csr_maps(), bad=st.sampled_from(["col_high", "col_negative", "rowptr_start",
                                              "rowptr_end", "rowptr_order", "weight_len",
                                              "values_int", "rowptr_int32", "values_3d"]),
       seed=st.integers(0, 1000))
def test_csr_errors(maps, bad, seed):
    n_cols, rowptr, col = maps
    values = rand((2, n_cols), torch.float32, "contiguous", seed)
    weight = None
    if bad == "col_high":
        assume(col.numel() > 0)
        col = col.clone()
        col[seed % col.numel()] = n_cols + seed % 3
        pattern = re.escape(f"col has entries outside [0, {n_cols})")
    elif bad == "col_negative":
        assume(col.numel() > 0)
        col = col.clone()
        col[seed % col.numel()] = -1 - seed % 3
        pattern = re.escape(f"col has entries outside [0, {n_cols})")
    elif bad == "rowptr_start":
        rowptr = rowptr + 1
        pattern = re.escape("rowptr[0] must be 0")
    elif bad == "rowptr_end":
        rowptr = torch.cat([rowptr, rowptr[-1:] + 1])
        pattern = "must equal the number of entries"
    elif bad == "rowptr_order":
        assume(rowptr.numel() >= 3)
        rowptr = rowptr.clone()
        rowptr[1] = int(rowptr[-1]) + 1  # > rowptr[2]
        pattern = "rowptr must be non-decreasing"
    elif bad == "weight_len":
        weight = torch.ones(col.numel() + 1, dtype=torch.float32)
        pattern = "one entry per col entry"
    elif bad == "values_int":
        values = values.long()
        pattern = "values must be float32"
    elif bad == "rowptr_int32":
        rowptr = rowptr.int()
        pattern = "rowptr must be int64"
    else:
        values = values.reshape(1, 2, n_cols)
        pattern = re.escape("values must be 1-d (S,) or 2-d (R, S)")
    raises(lambda: ops.csr_gather_sum(values, rowptr, col, weight), pattern)
    raises(lambda: torch.ops.pyobc.csr_gather_sum(values, rowptr, col, weight), pattern)
    if weight is None:
        raises(lambda: ops.csr_gather_reduce(values, rowptr, col, "amax"), pattern)
        raises(lambda: torch.ops.pyobc.csr_gather_reduce(values, rowptr, col, "mean_nonzero"),
               pattern)


@SETTINGS
@given(jobs=gather_jobs(), bad=st.sampled_from(["index_high", "index_negative", "dim_high",
                                                 "dim_low", "lengths", "index_int32",
                                                 "index_2d"]),
       seed=st.integers(0, 1000))
def test_gather_channels_errors(jobs, bad, seed):
    assume(jobs)
    tensors = [make_any(shape, dtype, layout, seed + i)
               for i, (shape, _, _, dtype, layout) in enumerate(jobs)]
    dims = [j[1] for j in jobs]
    indices = [torch.tensor(j[2], dtype=torch.long) for j in jobs]
    k = seed % len(jobs)
    size = tensors[k].shape[dims[k]]
    if bad == "index_high":
        indices[k] = torch.cat([indices[k], torch.tensor([size + seed % 2])])
        pattern = re.escape(f"indices[{k}] has entries outside [0, {size})")
    elif bad == "index_negative":
        indices[k] = torch.cat([torch.tensor([-1 - seed % 2]), indices[k]])
        pattern = re.escape(f"indices[{k}] has entries outside [0, {size})")
    elif bad in ("dim_high", "dim_low"):
        nd = tensors[k].dim()
        dims[k] = nd + seed % 2 if bad == "dim_high" else -nd - 1 - seed % 2
        pattern = re.escape(f"dims[{k}]={dims[k]} is out of range for a {nd}-d tensor")
    elif bad == "lengths":
        dims = dims + [0]
        pattern = "the three lists must have the same length"
    elif bad == "index_int32":
        indices[k] = indices[k].int()
        pattern = re.escape(f"indices[{k}] must be a 1-d int64 tensor")
    else:
        indices[k] = indices[k].reshape(1, -1)
        pattern = re.escape(f"indices[{k}] must be a 1-d int64 tensor")
    raises(lambda: ops.gather_channels(tensors, dims, indices), pattern)
    raises(lambda: torch.ops.pyobc.gather_channels(tensors, dims, indices), pattern)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       bad=st.sampled_from(["shape", "dtype", "int", "dim", "groups"]), seed=st.integers(0, 100))
def test_reduction_errors(shape, bad, seed):
    a = rand(shape, torch.float32, "contiguous", seed)
    b = a
    dim, groups = 0, 1
    w = rand([2] + shape, torch.float32, "contiguous", seed)
    t = w
    if bad == "shape":
        b = rand(shape + [2], torch.float32, "contiguous", seed)
        t = w[:1]
        pattern = "must have the same shape"
    elif bad == "dtype":
        b, t = a.double(), w.double()
        pattern = "must have the same dtype"
    elif bad == "int":
        a = b = a.long()
        w = t = w.long()
        pattern = "must be float32, float64, float16 or bfloat16"
    elif bad == "dim":
        dim = len(shape) + seed % 3
        pattern = re.escape(f"dim={dim} is out of range")
    else:
        groups = 3
        pattern = "does not divide|at least 2 dims"
    if bad != "groups":
        raises(lambda: ops.channel_dot(a, b, dim), pattern)
        raises(lambda: torch.ops.pyobc.channel_dot(a, b, dim), pattern)
    if bad not in ("dim",):
        raises(lambda: ops.weight_channel_sums(w, t, groups), pattern)
        raises(lambda: torch.ops.pyobc.weight_channel_sums(w, t, groups), pattern)


# ---------------------------------------------------------------------------------------------
# the other path (last, so that the subprocess had time to run)
# ---------------------------------------------------------------------------------------------

def test_reference_path_passes_the_same_properties(reference_run):
    if reference_run is None:
        pytest.skip("already running with PYOBC_DISABLE_EXT=1")
    out, _ = reference_run.communicate(timeout=300)
    assert reference_run.returncode == 0, out[-4000:]
    assert re.search(r"\d+ passed", out), out[-2000:]
