"""Tests of the compiled-op layer (pyobc.ops): results against independent computations, both
backends (compiled and pure-PyTorch reference), autograd, torch.library.opcheck, torch.compile,
argument errors, and the loader's fallback/reporting. CUDA cases run only where a GPU is present.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyobc.ops as ops
from pyobc.ops import _registry
from pyobc.ops import reference as _reference

ROOT = Path(__file__).resolve().parents[1]
DISABLED = os.environ.get("PYOBC_DISABLE_EXT", "").strip() == "1"
COMPILED = ops.backend_report()["extension"]["status"] == "loaded"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_compiled = pytest.mark.skipif(not COMPILED, reason="compiled library not loaded")

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# independent expectations
# ---------------------------------------------------------------------------------------------

def expected_channel_dot(a, b, dim, per_sample):
    """(a*b) summed in float64 over every dim but `dim` (and 0 with per_sample); also the sum of
    |a*b| over the same dims, which scales the tolerance."""
    dim %= a.dim()
    keep = {dim, 0} if per_sample else {dim}
    dims = [d for d in range(a.dim()) if d not in keep]
    p = a.double() * b.double()
    if not dims:
        return p, p.abs()
    return p.sum(dims), p.abs().sum(dims)


def expected_weight_sums(w, t, groups):
    """Per (o, j) sums, then a loop over the groups for the in-channel sums."""
    out_ch, in_pg = w.shape[0], w.shape[1]
    prod = w.double() * t.double()
    per_pair = prod.reshape(out_ch, in_pg, -1).sum(-1)  # (O, I/groups)
    abs_pair = prod.abs().reshape(out_ch, in_pg, -1).sum(-1)
    per_group = out_ch // groups
    in_sums, in_abs = [], []
    for g in range(groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        in_sums.append(per_pair[rows].sum(0))
        in_abs.append(abs_pair[rows].sum(0))
    return ((per_pair.sum(1), abs_pair.sum(1)),
            (torch.cat(in_sums) if in_sums else torch.zeros(0, dtype=torch.float64),
             torch.cat(in_abs) if in_abs else torch.zeros(0, dtype=torch.float64)))


def assert_close(got, want, abs_sum, dtype):
    """Error bounds relative to sum |a*b|: float64 input, float64 rounding; float32 input, short
    float32 blocks (<= 256 products or 16 rows) added in float64, then rounded to float32;
    float16/bfloat16, float32 accumulation."""
    rel = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-5)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == want.shape
    got = got.detach().double().cpu()
    bound = rel * abs_sum + rel * 1e-3
    err = (got - want).abs()
    assert bool((err <= bound).all()), \
        f"max err {err.max().item():.3g}, bound {bound.max().item():.3g}"


def make(shape, dtype=torch.float32, layout="contiguous", seed=0, device="cpu"):
    """A tensor of `shape` with values in [-1, 1) and the given memory layout."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return (2 * torch.rand(size, generator=gen, dtype=torch.float64) - 1).to(dtype=dtype,
                                                                                device=device)
    if layout == "channels_last":
        return rand(*shape).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense but not contiguous: the last two dims swapped
        return rand(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "sliced":  # not dense: every other element of the last dim
        return rand(*shape[:-1], 2 * shape[-1])[..., ::2]
    if layout == "expanded":  # stride 0 on dim 0
        return rand(1, *shape[1:]).expand(shape)
    return rand(*shape)


# ---------------------------------------------------------------------------------------------
# channel_dot
# ---------------------------------------------------------------------------------------------

# (shape, dim, per_sample, layout); chosen to reach every CPU path (per-sample tasks, per-entry
# tasks, row-split tasks) and every in-place/copy layout decision.
CHANNEL_DOT_CASES = [
    ((7,), 0, False, "contiguous"),
    ((5, 6), 1, False, "contiguous"),
    ((5, 6), 0, False, "contiguous"),
    ((5, 6), -1, True, "contiguous"),
    ((4, 9, 6), -1, False, "contiguous"),      # tokens, channel innermost
    ((4, 9, 6), -1, True, "contiguous"),
    ((3, 5, 7), 1, False, "contiguous"),
    ((3, 5, 7), 1, True, "transposed"),        # dense permutation: read in place
    ((3, 5, 7), 2, False, "transposed"),
    ((3, 5, 7), 1, False, "sliced"),           # not dense: copied
    ((3, 5, 7), 2, True, "expanded"),          # stride 0: copied
    ((4, 6, 5, 5), 1, False, "contiguous"),    # conv activation
    ((4, 6, 5, 5), 1, True, "contiguous"),
    ((4, 6, 5, 5), 1, False, "channels_last"),
    ((4, 6, 5, 5), 1, True, "channels_last"),
    ((4, 6, 5, 5), 3, True, "channels_last"),
    ((2, 3, 4, 5, 6), 2, True, "contiguous"),
    ((16, 8, 20), 1, True, "contiguous"),      # many samples: one task per sample
    ((1, 8, 32, 32), 1, False, "contiguous"),  # one image: one task per channel
    ((2, 8, 32, 32), 1, True, "contiguous"),
    ((64, 16, 40), 1, False, "contiguous"),    # many rows: row-split tasks
    ((8, 50, 24), -1, False, "contiguous"),
    ((1, 3, 40, 40), 1, False, "channels_last"),
    ((8, 1, 9), 1, True, "contiguous"),        # C == 1
    ((1, 5, 1, 9), 2, True, "contiguous"),     # size-1 dims everywhere
    ((3, 1, 40), 1, False, "contiguous"),      # C == 1, one run per sample
    ((3, 7, 1100), -1, False, "contiguous"),   # more channels than one accumulator chunk
    ((3, 5, 1030), -1, True, "contiguous"),
]


def _case_id(case):
    shape, dim, ps, layout = case
    return f"{'x'.join(map(str, shape))}-d{dim}{'-ps' if ps else ''}-{layout}"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", CHANNEL_DOT_CASES, ids=_case_id)
def test_channel_dot_matches_float64_sum(case, dtype):
    shape, dim, per_sample, layout = case
    a = make(shape, dtype, layout, seed=1)
    b = make(shape, dtype, layout, seed=2)
    want, abs_sum = expected_channel_dot(a, b, dim, per_sample)
    assert_close(ops.channel_dot(a, b, dim, per_sample), want, abs_sum, dtype)


def test_channel_dot_mixed_layouts():
    a = make((3, 4, 5, 6), layout="channels_last", seed=1)
    b = make((3, 4, 5, 6), layout="contiguous", seed=2)
    for per_sample in (False, True):
        want, abs_sum = expected_channel_dot(a, b, 1, per_sample)
        assert_close(ops.channel_dot(a, b, 1, per_sample), want, abs_sum, torch.float32)


def test_channel_dot_float64_is_exact_on_integers():
    # integer-valued float64 inputs: every partial sum is exact, so the result must be too
    a = torch.randint(-50, 50, (6, 5, 7, 3), dtype=torch.float64)
    b = torch.randint(-50, 50, (6, 5, 7, 3), dtype=torch.float64)
    assert torch.equal(ops.channel_dot(a, b, 1), (a * b).sum((0, 2, 3)))
    assert torch.equal(ops.channel_dot(a, b, -1, per_sample=True), (a * b).sum((1, 2)))


def test_channel_dot_float32_accumulates_beyond_float32():
    # 2**24 + 8 ones per channel: a plain float32 accumulator would stop at 2**24
    n = 2 ** 24 + 8
    ones = torch.ones(n, 2, dtype=torch.float32)
    assert ops.channel_dot(ones[:, :1], ones[:, :1], 1).item() == float(n)  # one long run
    assert ops.channel_dot(ones, ones, 1).tolist() == [float(n)] * 2     # channel innermost


@pytest.mark.parametrize("shape,dim,per_sample", [
    ((0, 4, 3), 1, False), ((0, 4, 3), 1, True), ((3, 0, 5), 1, False), ((3, 0, 5), 2, True),
    ((2, 3, 0), 1, True), ((0,), 0, False)])
def test_channel_dot_empty(shape, dim, per_sample):
    a = torch.empty(shape, dtype=torch.float32)
    out = ops.channel_dot(a, a, dim, per_sample)
    want_shape = (shape[0], shape[dim]) if per_sample else (shape[dim],)
    assert out.shape == want_shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros(want_shape, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# weight_channel_sums
# ---------------------------------------------------------------------------------------------

WEIGHT_CASES = [  # (shape, groups, layout)
    ((6, 4, 3, 3), 1, "contiguous"),
    ((6, 4, 3, 3), 2, "contiguous"),
    ((8, 1, 3, 3), 8, "contiguous"),     # depthwise
    ((12, 3, 3, 3), 4, "channels_last"),  # read in place
    ((10, 7), 1, "contiguous"),           # linear
    ((10, 7), 1, "transposed"),           # linear weight stored transposed: copied
    ((10, 7), 5, "contiguous"),
    ((6, 2, 5), 3, "contiguous"),         # conv1d
    ((4, 2, 2, 3, 3), 2, "contiguous"),   # conv3d
    ((64, 32, 3, 3), 4, "contiguous"),    # several tasks
    ((256, 40), 1, "contiguous"),
    ((6, 4, 3, 3), 1, "sliced"),
    ((40, 1100), 2, "contiguous"),        # more in-channels than one accumulator chunk
    ((4, 1), 1, "contiguous"),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", WEIGHT_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-g{c[1]}-{c[2]}")
def test_weight_channel_sums_matches_loops(case, dtype):
    shape, groups, layout = case
    w = make(shape, dtype, layout, seed=3)
    t = make(shape, dtype, layout, seed=4)
    (want_out, abs_out), (want_in, abs_in) = expected_weight_sums(w, t, groups)
    out_sums, in_sums = ops.weight_channel_sums(w, t, groups)
    assert_close(out_sums, want_out, abs_out, dtype)
    assert_close(in_sums, want_in, abs_in, dtype)


def test_weight_channel_sums_conv_identity():
    # sum of the out-channel sums == sum of the in-channel sums == <w, t>
    weight = torch.randn(12, 2, 3, 3, dtype=torch.float64)  # Conv2d(8, 12, 3, groups=4)
    t = torch.randn_like(weight)
    out_sums, in_sums = ops.weight_channel_sums(weight, t, groups=4)
    assert in_sums.shape == (8,) and out_sums.shape == (12,)
    total = (weight * t).sum()
    torch.testing.assert_close(out_sums.sum(), total)
    torch.testing.assert_close(in_sums.sum(), total)


@pytest.mark.parametrize("shape,groups",
                         [((0, 3, 3), 1), ((0, 3), 4), ((4, 0, 3), 2), ((5, 3, 0), 1)])
def test_weight_channel_sums_empty(shape, groups):
    w = torch.empty(shape, dtype=torch.float32)
    out_sums, in_sums = ops.weight_channel_sums(w, w, groups)
    assert out_sums.shape == (shape[0],) and in_sums.shape == (groups * shape[1],)
    assert not out_sums.any() and not in_sums.any()


# ---------------------------------------------------------------------------------------------
# property test over random shapes / dims / layouts
# ---------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       dim_seed=st.integers(0, 100), per_sample=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_channel_dot_property(shape, dim_seed, per_sample, layout, dtype):
    nd = len(shape)
    if nd < 2:
        per_sample = False
        layout = "contiguous" if layout == "transposed" else layout
    dim = dim_seed % nd - (nd if dim_seed % 2 else 0)  # negative dims too
    if per_sample and dim % nd == 0:
        dim = 1
    a = make(tuple(shape), dtype, layout, seed=dim_seed)
    b = make(tuple(shape), dtype, layout, seed=dim_seed + 1)
    want, abs_sum = expected_channel_dot(a, b, dim, per_sample)
    assert_close(ops.channel_dot(a, b, dim, per_sample), want, abs_sum, dtype)


# ---------------------------------------------------------------------------------------------
# both backends agree; the extension really is loaded; schemas match
# ---------------------------------------------------------------------------------------------

@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_compiled_matches_reference(dtype):
    a, b = make((5, 6, 7, 4), dtype, seed=5), make((5, 6, 7, 4), dtype, seed=6)
    for dim, ps in ((1, False), (1, True), (-1, True), (0, False)):
        got = torch.ops.pyobc.channel_dot(a, b, dim, ps)
        ref = _reference.channel_dot(a, b, dim, ps)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    w, t = make((8, 3, 3, 3), dtype, seed=7), make((8, 3, 3, 3), dtype, seed=8)
    for got, ref in zip(torch.ops.pyobc.weight_channel_sums(w, t, 2),
                        _reference.weight_channel_sums(w, t, 2)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DISABLED, reason="PYOBC_DISABLE_EXT=1")
def test_compiled_library_is_loaded():
    # a broken or missing build must fail here instead of silently falling back
    report = ops.backend_report()
    assert report["extension"]["status"] == "loaded", report["extension"]["error"]
    for name, info in report["ops"].items():
        assert info["cpu"] == "compiled", name


def _compiled_schema_strings():
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    return re.findall(r'm\.def\(\s*"([^"]+)"', text)


def test_schemas_match_csrc():
    # csrc/ops.cpp and pyobc/ops/_registry.py are the two places a schema is written
    assert sorted(_compiled_schema_strings()) == sorted(spec.schema for spec in _registry.OPS)
    for spec in _registry.OPS:
        registered = str(getattr(torch.ops.pyobc, spec.name).default._schema)
        assert registered == f"pyobc::{spec.schema}"


def test_info_lists_every_op_with_its_backends():
    from pyobc.versions import format_info
    lines = format_info().splitlines()
    for spec in _registry.OPS:
        row = [line.split() for line in lines if line.split()[:1] == [spec.name]]
        assert len(row) == 1, spec.name
        assert row[0][1] in ("compiled", "reference") and row[0][2] in ("compiled", "reference")


def test_backend_report_shape():
    report = ops.backend_report()
    assert set(report) == {"extension", "cuda_available", "ops"}
    assert set(report["ops"]) == {spec.name for spec in _registry.OPS}
    for info in report["ops"].values():
        assert info["cpu"] in ("compiled", "reference")
        assert info["cuda"] in ("compiled", "reference")
    if not report["extension"]["cuda_kernels"]:
        assert all(info["cuda"] == "reference" for info in report["ops"].values())
    report["ops"].clear()  # a copy: the module state is untouched
    assert ops.backend_report()["ops"]


# The same fixed-seed calls of every op, run by this process (compiled kernels when loaded) and by
# a subprocess with PYOBC_DISABLE_EXT=1 (the registered reference kernels): their results must
# agree. Executed from source in both processes.
_AGREEMENT_CODE = textwrap.dedent("""
    def agreement_cases():
        import torch
        import pyobc.ops as ops
        g = torch.Generator().manual_seed(123)

        def r(*shape, dtype=torch.float32):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        a, b = r(4, 6, 5, 5), r(4, 6, 5, 5)
        a64, b64 = r(3, 7, 9, dtype=torch.float64), r(3, 7, 9, dtype=torch.float64)
        w, t = r(6, 2, 3, 3), r(6, 2, 3, 3)
        wh, th = r(8, 4, 3, dtype=torch.bfloat16), r(8, 4, 3, dtype=torch.bfloat16)
        rowptr, col = torch.tensor([0, 3, 3, 5, 9, 12]), torch.randint(0, 11, (12,), generator=g)
        v = r(3, 11)
        v[0, :4] = 0
        v16 = r(11, 3, dtype=torch.float16).t()   # (3, 11) with strides (1, 3)
        wts = r(12)
        ts = [r(6, 4, 3), torch.randint(-5, 5, (5, 7), generator=g),
              r(6, 4, dtype=torch.bfloat16).t(), r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
              torch.rand(4, 3, generator=g) > 0.5]
        idx = [torch.tensor([5, 0, 0]), torch.tensor([6, 1]), torch.tensor([2, 3, 0]),
               torch.tensor([1, 0]), torch.tensor([], dtype=torch.long)]
        return {
            "channel_dot": lambda: ops.channel_dot(a, b, 1, per_sample=True),
            "channel_dot_f64": lambda: ops.channel_dot(a64, b64, -1),
            "weight_channel_sums": lambda: ops.weight_channel_sums(w, t, 3),
            "weight_channel_sums_bf16": lambda: ops.weight_channel_sums(wh, th, 2),
            "csr_gather_sum": lambda: ops.csr_gather_sum(v, rowptr, col, wts),
            "csr_gather_sum_1d": lambda: ops.csr_gather_sum(v[1], rowptr, col),
            "csr_gather_sum_f16": lambda: ops.csr_gather_sum(v16, rowptr, col),
            "amax": lambda: ops.csr_gather_reduce(v, rowptr, col, "amax"),
            "count_nonzero": lambda: ops.csr_gather_reduce(v, rowptr, col, "count_nonzero"),
            "mean_nonzero": lambda: ops.csr_gather_reduce(v, rowptr, col, "mean_nonzero"),
            "gather_channels": lambda: ops.gather_channels(ts, [0, -1, 1, 1, 1], idx),
        }
""")

_SUBPROCESS_CHECK = textwrap.dedent("""
    import json, os, warnings
    warnings.simplefilter("error", RuntimeWarning)   # disabled on purpose: must not warn
    import torch, pyobc.ops as ops
    from pyobc.ops import reference as _reference
    a = torch.randn(4, 6, 5, 5); b = torch.randn(4, 6, 5, 5)
    w = torch.randn(6, 2, 3, 3); t = torch.randn(6, 2, 3, 3)
    cd = ops.channel_dot(a, b, 1, per_sample=True)
    ws = ops.weight_channel_sums(w, t, 3)
    exec(os.environ["PYOBC_AGREEMENT_CODE"])
    torch.save({name: fn() for name, fn in agreement_cases().items()},
               os.environ["PYOBC_AGREEMENT_OUT"])
    print(json.dumps({
        "report": ops.backend_report(),
        "cd_err": (cd.double() - (a.double() * b.double()).sum((2, 3))).abs().max().item(),
        "ws_err": max((x - y).abs().max().item() for x, y in
                      zip(ws, _reference.weight_channel_sums(w, t, 3))),
        "grad_ok": torch.autograd.gradcheck(
            lambda x, y: ops.channel_dot(x, y, 1),
            (a[:2, :2, :2].double().requires_grad_(), b[:2, :2, :2].double().requires_grad_())),
    }))
""")


_FAILED_LOAD_CHECK = textwrap.dedent("""
    import sys, json, warnings
    sys.modules["pyobc._C"] = None   # makes `import pyobc._C` fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, pyobc.ops as ops
        import pyobc.ops  # a second import must not warn again
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
            and "pyobc" in str(w.message)]
    x = torch.randn(3, 4)
    print(json.dumps({"msgs": msgs, "report": ops.backend_report(),
                      "ok": bool(torch.allclose(ops.channel_dot(x, x, 1), (x * x).sum(0)))}))
""")


@pytest.fixture(scope="module", autouse=True)
def subprocess_results(tmp_path_factory):
    """Starts the fallback checks in fresh interpreters when this module's first test runs, so
    that their torch import overlaps with the other tests; the tests below wait for them."""
    out = tmp_path_factory.mktemp("agreement") / "reference.pt"
    runs = {"disabled": (_SUBPROCESS_CHECK, "1"), "failed": (_FAILED_LOAD_CHECK, "0")}
    procs = {name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                                    env=dict(os.environ, PYOBC_DISABLE_EXT=flag,
                                             OMP_NUM_THREADS="1",
                                             PYOBC_AGREEMENT_CODE=_AGREEMENT_CODE,
                                             PYOBC_AGREEMENT_OUT=str(out)))
             for name, (code, flag) in runs.items()}
    procs["agreement_file"] = out
    yield procs
    for name, proc in procs.items():
        if name != "agreement_file" and proc.poll() is None:
            proc.kill()
            proc.communicate()


def _result(procs, name):
    stdout, stderr = procs[name].communicate(timeout=180)
    assert procs[name].returncode == 0, stderr
    return json.loads(stdout)


def test_disabled_extension_uses_reference(subprocess_results):
    out = _result(subprocess_results, "disabled")
    report = out["report"]
    assert report["extension"]["status"] == "disabled"
    for info in report["ops"].values():
        assert info["cpu"] == "reference" and info["cuda"] == "reference"
    assert out["cd_err"] < 1e-5 and out["ws_err"] < 1e-5 and out["grad_ok"]


def test_both_paths_agree(subprocess_results):
    """Every op, same inputs: this process's kernels (compiled unless disabled) against the
    reference kernels of a PYOBC_DISABLE_EXT=1 interpreter."""
    _result(subprocess_results, "disabled")
    reference = torch.load(subprocess_results["agreement_file"], weights_only=True)
    namespace: dict = {}
    exec(_AGREEMENT_CODE, namespace)
    cases = namespace["agreement_cases"]()
    assert set(reference) == set(cases)
    for name, fn in cases.items():
        got = torch.utils._pytree.tree_leaves(fn())
        want = torch.utils._pytree.tree_leaves(reference[name])
        assert len(got) == len(want), name
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            if x.dtype.is_floating_point and name not in ("gather_channels", "amax",
                                                          "count_nonzero"):
                tol = 1e-6 if x.dtype in (torch.float32, torch.float64) else 1e-2
                torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=name)
            else:  # pure data movement / exact reductions: bit-identical
                assert torch.equal(x, y), name


def test_failed_load_warns_once_and_falls_back(subprocess_results):
    out = _result(subprocess_results, "failed")
    assert len(out["msgs"]) == 1 and "pyobc._C" in out["msgs"][0]
    assert out["report"]["extension"]["status"] == "failed"
    assert "pyobc._C" in out["report"]["extension"]["error"]
    assert out["report"]["ops"]["channel_dot"]["cpu"] == "reference"
    assert out["ok"]


# ---------------------------------------------------------------------------------------------
# autograd, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def test_gradcheck_channel_dot():
    for shape, dim, ps, layout in [((3, 4, 5), 1, False, "contiguous"),
                                   ((3, 4, 2, 2), 1, True, "channels_last"),
                                   ((3, 4, 5), -1, True, "transposed")]:
        a = make(shape, torch.float64, layout, seed=1).requires_grad_()
        b = make(shape, torch.float64, layout, seed=2).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: ops.channel_dot(x, y, dim, ps), (a, b))
    a = make((3, 4, 5), torch.float64, seed=3).requires_grad_()
    b = make((3, 4, 5), torch.float64, seed=4).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, y: ops.channel_dot(x, y, 1, True), (a, b),
                                        fast_mode=True)


def test_gradcheck_weight_channel_sums():
    for shape, groups in [((6, 2, 3, 3), 3), ((5, 4), 1), ((4, 1, 3), 4)]:
        w = make(shape, torch.float64, seed=1).requires_grad_()
        t = make(shape, torch.float64, seed=2).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: ops.weight_channel_sums(x, y, groups), (w, t))
    # only one of the two outputs used
    w = make((4, 2, 3), torch.float64, seed=3).requires_grad_()
    t = make((4, 2, 3), torch.float64, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ops.weight_channel_sums(x, y, 2)[1], (w, t))
    assert torch.autograd.gradgradcheck(lambda x, y: ops.weight_channel_sums(x, y, 2), (w, t),
                                        fast_mode=True)


def test_low_precision_grad_dtype():
    a = make((3, 4, 5), torch.bfloat16, seed=1).requires_grad_()
    b = make((3, 4, 5), torch.bfloat16, seed=2)
    ops.channel_dot(a, b, 1).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad, b, rtol=0, atol=0)


def _csr_sample(device="cpu", seed=0):
    """A CSR map with an empty row, a repeated column and entries out of column order."""
    rowptr = torch.tensor([0, 2, 2, 5, 6], device=device)
    col = torch.tensor([4, 0, 1, 1, 3, 2], device=device)
    return rowptr, col


def _opcheck_samples(device="cpu"):
    cd, ws = torch.ops.pyobc.channel_dot.default, torch.ops.pyobc.weight_channel_sums.default
    cs, cr = torch.ops.pyobc.csr_gather_sum.default, torch.ops.pyobc.csr_gather_reduce.default
    gc = torch.ops.pyobc.gather_channels.default
    sc = torch.ops.pyobc.channel_scale.default
    f64 = torch.float64
    rowptr, col = _csr_sample(device)
    full_rowptr = torch.tensor([0, 2, 3, 5, 6], device=device)  # no empty row (amax: finite)
    samples = []
    for grad in (False, True):
        def mk(shape, layout="contiguous", seed=0, dtype=torch.float32):
            return make(shape, dtype, layout, seed, device).requires_grad_(grad)
        samples += [
            (cd, (mk((3, 4, 5), seed=1), mk((3, 4, 5), seed=2), 1, False)),
            (cd, (mk((2, 3, 4, 4), "channels_last", 1), mk((2, 3, 4, 4), "channels_last", 2),
                  1, True)),
            (cd, (mk((2, 5, 3), "transposed", 3, f64), mk((2, 5, 3), "transposed", 4, f64),
                  -1, True)),
            (ws, (mk((6, 2, 3, 3), seed=5), mk((6, 2, 3, 3), seed=6), 3)),
            (ws, (mk((5, 4), seed=7, dtype=f64), mk((5, 4), seed=8, dtype=f64), 1)),
            (sc, (mk((3, 4, 5), seed=19), mk((4,), seed=20), 1, False)),
            (sc, (mk((2, 3, 4, 4), "channels_last", 21, f64), mk((2, 3), seed=22, dtype=f64), 1, True)),
        ]
    # the index ops: a few samples, most with gradients
    grad_ = dict(dtype=torch.float64)
    samples += [
        (cs, (make((5,), seed=9, device=device), rowptr, col, None)),
        (cs, (make((3, 5), seed=10, device=device, **grad_).requires_grad_(), rowptr, col,
              make((6,), seed=11, device=device, **grad_).requires_grad_())),
        (cs, (make((3, 5), layout="transposed", seed=12, device=device).requires_grad_(),
              rowptr, col, None)),
        (cr, (make((2, 5), seed=13, device=device, **grad_).requires_grad_(), full_rowptr, col,
              "amax")),
        (cr, (make((2, 5), seed=14, device=device, **grad_).requires_grad_(), rowptr, col,
              "mean_nonzero")),
        (cr, (make((5,), seed=15, device=device), rowptr, col, "count_nonzero")),
        (gc, ([make((4, 3, 2), seed=16, device=device, **grad_).requires_grad_(),
               torch.arange(12, device=device).reshape(3, 4),
               make((3, 5), layout="transposed", seed=17, device=device).requires_grad_()],
              [1, -1, 0],
              [torch.tensor([2, 0, 2], device=device), torch.tensor([3, 1], device=device),
               torch.tensor([1], device=device)])),
        (gc, ([make((6,), seed=18, device=device, dtype=torch.bfloat16)], [0],
              [torch.tensor([], dtype=torch.long, device=device)])),
    ]
    # conv2d_sq_grad_sums has no derivative: inputs without gradients
    cq = torch.ops.pyobc.conv2d_sq_grad_sums.default
    samples += [
        (cq, (make((3, 4, 6, 6), seed=23, device=device), make((3, 5, 6, 6), seed=24, device=device),
              [3, 3], [1, 1], [1, 1], [1, 1])),
        (cq, (make((2, 3, 7, 5), layout="channels_last", seed=25, device=device), make((2, 4, 4, 2), seed=26, device=device),
              [3, 2], [2, 2], [1, 0], [1, 1])),
        (cq, (make((2, 3, 6, 6), seed=27, device=device, dtype=f64), make((2, 2, 4, 4), seed=28, device=device,
                                                                           dtype=f64),
              [2, 2], [1, 1], [0, 0], [2, 2])),
    ]
    return samples


N_OPCHECK = 25


@pytest.mark.parametrize("index", range(N_OPCHECK))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_opcheck_sample_count():
    assert len(_opcheck_samples()) == N_OPCHECK


def test_gradcheck_csr_ops():
    rowptr, col = _csr_sample()
    full_rowptr = torch.tensor([0, 2, 3, 5, 6])
    v = make((3, 5), torch.float64, seed=1).requires_grad_()
    w = make((6,), torch.float64, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ops.csr_gather_sum(x, rowptr, col, y), (v, w))
    assert torch.autograd.gradgradcheck(lambda x, y: ops.csr_gather_sum(x, rowptr, col, y),
                                        (v, w), fast_mode=True)
    v1 = make((5,), torch.float64, layout="sliced", seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.csr_gather_sum(x, rowptr, col), (v1,))
    for reduce, rp in (("amax", full_rowptr), ("mean_nonzero", rowptr)):
        assert torch.autograd.gradcheck(lambda x: ops.csr_gather_reduce(x, rp, col, reduce), (v,))
        assert torch.autograd.gradgradcheck(
            lambda x: ops.csr_gather_reduce(x, rp, col, reduce), (v,), fast_mode=True)


def test_csr_reduce_gradient_rules():
    # amax: ties share the gradient (as torch.amax); mean_nonzero: grad / count for every entry
    rowptr, col = torch.tensor([0, 3]), torch.tensor([0, 1, 2])
    v = torch.tensor([2.0, 2.0, 1.0], requires_grad=True)
    ops.csr_gather_reduce(v, rowptr, col, "amax").sum().backward()
    assert v.grad.tolist() == [0.5, 0.5, 0.0]
    v = torch.tensor([0.0, 3.0, 1.0], requires_grad=True)
    out = ops.csr_gather_reduce(v, rowptr, col, "mean_nonzero")
    assert out.item() == 2.0
    out.sum().backward()
    assert v.grad.tolist() == [0.5, 0.5, 0.5]
    v.grad = None
    out = ops.csr_gather_reduce(v, rowptr, col, "count_nonzero")
    assert out.item() == 2.0
    out.sum().backward()  # a step function: no gradient
    assert v.grad is None or not v.grad.any()


def test_gradcheck_gather_channels():
    x = make((4, 3, 2), torch.float64, seed=1).requires_grad_()
    y = make((5, 3), torch.float64, layout="transposed", seed=2).requires_grad_()
    ints = torch.arange(6).reshape(2, 3)
    idx = [torch.tensor([2, 0, 2]), torch.tensor([1]), torch.tensor([4, 4, 0])]

    def f(a, b):
        return ops.gather_channels([a, ints, b], [1, 0, 0], idx)[::2]

    assert torch.autograd.gradcheck(f, (x, y))
    assert torch.autograd.gradgradcheck(f, (x, y), fast_mode=True)
    outs = ops.gather_channels([ints, x], [1, -1], [torch.tensor([0]), torch.tensor([1, 1])])
    outs[1].sum().backward()
    assert torch.equal(x.grad[..., 1], torch.full((4, 3), 2.0, dtype=torch.float64))
    assert not outs[0].requires_grad


def test_torch_compile_fullgraph():
    def f(a, b, w, t):
        out_sums, in_sums = ops.weight_channel_sums(w, t, groups=2)
        return ops.channel_dot(a, b, 1) * 2, ops.channel_dot(a, b, -1, per_sample=True), \
            out_sums + 1, in_sums

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = make((2, 3, 4, 4), seed=1).requires_grad_()
    b = make((2, 3, 4, 4), seed=2)
    w, t = make((4, 2, 3, 3), seed=3), make((4, 2, 3, 3), seed=4)
    for got, want in zip(compiled(a, b, w, t), f(a, b, w, t)):
        torch.testing.assert_close(got, want)
    compiled(a, b, w, t)[0].sum().backward()
    torch.testing.assert_close(a.grad, 2 * b)


def test_torch_compile_index_ops_fullgraph():
    rowptr, col = _csr_sample()
    full_rowptr = torch.tensor([0, 2, 3, 5, 6])

    def f(v, w, x):
        s = ops.csr_gather_sum(v, rowptr, col, w)
        m = ops.csr_gather_reduce(v, full_rowptr, col, "amax")
        k = ops.csr_gather_reduce(v, rowptr, col, "mean_nonzero")
        a, b = ops.gather_channels([x, v], [0, 1], [torch.tensor([2, 0]), torch.tensor([4])])
        return s * 2, m, k, a + 1, b

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    v = make((3, 5), seed=1).requires_grad_()
    w = make((6,), seed=2)
    x = make((3, 4), seed=3).requires_grad_()
    for got, want in zip(compiled(v, w, x), f(v, w, x)):
        torch.testing.assert_close(got, want)
    sum(o.sum() for o in compiled(v, w, x)).backward()
    gv, gx = v.grad.clone(), x.grad.clone()
    v.grad = x.grad = None
    sum(o.sum() for o in f(v, w, x)).backward()
    torch.testing.assert_close(gv, v.grad)
    torch.testing.assert_close(gx, x.grad)


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------

# explicit dtypes: other test modules change torch's default dtype at import time
_x = torch.randn(3, 4, 5, dtype=torch.float32)
_w = torch.randn(6, 2, 3, dtype=torch.float32)
_v = torch.randn(2, 5, dtype=torch.float32)
_rp, _col = torch.tensor([0, 2, 2, 6]), torch.tensor([4, 0, 1, 1, 3, 2])
_i = torch.tensor([0, 2, 0])

ERROR_CASES = [
    ("shape", lambda: ops.channel_dot(_x, _x[:2]), ValueError, "a and b must have the same shape"),
    ("dtype", lambda: ops.channel_dot(_x, _x.double()), TypeError, "same dtype"),
    ("int", lambda: ops.channel_dot(_x.long(), _x.long()), TypeError, "a must be float32"),
    ("device", lambda: ops.channel_dot(_x, _x.to("meta")), ValueError, "same device"),
    ("not tensor", lambda: ops.channel_dot(_x, 1.0), TypeError, "b must be a torch.Tensor"),
    ("dim range", lambda: ops.channel_dot(_x, _x, 3), ValueError, "dim=3 is out of range"),
    ("dim type", lambda: ops.channel_dot(_x, _x, 1.0), TypeError, "dim must be an int"),
    ("scalar", lambda: ops.channel_dot(_x[0, 0, 0], _x[0, 0, 0], 0), ValueError, "at least 1"),
    ("ps 1-d", lambda: ops.channel_dot(_x[0, 0], _x[0, 0], 0, True), ValueError, "per_sample"),
    ("ps dim 0", lambda: ops.channel_dot(_x, _x, 0, True), ValueError, "dim must not be 0"),
    ("ps type", lambda: ops.channel_dot(_x, _x, 1, 1), TypeError, "per_sample must be a bool"),
    ("sparse", lambda: ops.channel_dot(_x.to_sparse(), _x.to_sparse()), TypeError, "strided"),
    ("w shape", lambda: ops.weight_channel_sums(_w, _w[:3]), ValueError,
     "w and t must have the same shape"),
    ("w int", lambda: ops.weight_channel_sums(_w.int(), _w.int()), TypeError, "w must be float32"),
    ("w 1-d", lambda: ops.weight_channel_sums(_w[0, 0], _w[0, 0]), ValueError, "at least 2 dims"),
    ("groups", lambda: ops.weight_channel_sums(_w, _w, 4), ValueError, "groups=4 does not divide"),
    ("groups 0", lambda: ops.weight_channel_sums(_w, _w, 0), ValueError, "groups must be >= 1"),
    ("groups type", lambda: ops.weight_channel_sums(_w, _w, "2"), TypeError,
     "groups must be an int"),
    ("csr values int", lambda: ops.csr_gather_sum(_rp, _rp, _col), TypeError,
     "values must be float32"),
    ("csr rowptr int32", lambda: ops.csr_gather_sum(_v, _rp.int(), _col), TypeError,
     "rowptr must be int64"),
    ("csr col float", lambda: ops.csr_gather_sum(_v, _rp, _col.float()), TypeError,
     "col must be int64"),
    ("csr 3-d", lambda: ops.csr_gather_sum(_v.reshape(1, 2, 5), _rp, _col), ValueError,
     "values must be 1-d (S,) or 2-d (R, S)"),
    ("csr rowptr 2-d", lambda: ops.csr_gather_sum(_v, _rp.reshape(1, -1), _col), ValueError,
     "rowptr must be a 1-d tensor"),
    ("csr rowptr empty", lambda: ops.csr_gather_sum(_v, _rp[:0], _col), ValueError,
     "N+1 >= 1 offsets"),
    ("csr weight len", lambda: ops.csr_gather_sum(_v, _rp, _col, _v[0, :3]), ValueError,
     "one entry per col entry (6)"),
    ("csr weight dtype", lambda: ops.csr_gather_sum(_v, _rp, _col, _v[0, :6].double()),
     TypeError, "weight must have the dtype of values"),
    ("csr device", lambda: ops.csr_gather_sum(_v, _rp.to("meta"), _col), ValueError,
     "same device"),
    ("csr col range", lambda: ops.csr_gather_sum(_v, _rp, _col + 1), RuntimeError,
     "col has entries outside [0, 5)"),
    ("csr col negative", lambda: ops.csr_gather_sum(_v, _rp, _col - 1), RuntimeError,
     "col has entries outside [0, 5)"),
    ("csr rowptr start", lambda: ops.csr_gather_sum(_v, _rp + 1, _col), RuntimeError,
     "rowptr[0] must be 0"),
    ("csr rowptr order", lambda: ops.csr_gather_sum(_v, torch.tensor([0, 4, 2, 6]), _col),
     RuntimeError, "rowptr must be non-decreasing"),
    ("csr rowptr end", lambda: ops.csr_gather_sum(_v, torch.tensor([0, 2, 5]), _col),
     RuntimeError, "must equal the number of entries col.numel()=6"),
    ("reduce name", lambda: ops.csr_gather_reduce(_v, _rp, _col, "max"), ValueError,
     "reduce must be 'amax', 'count_nonzero' or 'mean_nonzero', got 'max'"),
    ("reduce type", lambda: ops.csr_gather_reduce(_v, _rp, _col, 1), TypeError,
     "reduce must be a str"),
    ("gather lengths", lambda: ops.gather_channels([_x], [0, 1], [_i]), ValueError,
     "got 1 tensors, 2 dims and 1 index tensors"),
    ("gather not list", lambda: ops.gather_channels(_x, [0], [_i]), TypeError,
     "tensors must be a list or tuple"),
    ("gather dim", lambda: ops.gather_channels([_x], [3], [_i]), ValueError,
     "dims[0]=3 is out of range for a 3-d tensor"),
    ("gather dim neg", lambda: ops.gather_channels([_x], [-4], [_i]), ValueError,
     "dims[0]=-4 is out of range"),
    ("gather dim type", lambda: ops.gather_channels([_x], [0.0], [_i]), TypeError,
     "dims[0] must be an int"),
    ("gather index dtype", lambda: ops.gather_channels([_x], [0], [_i.int()]), TypeError,
     "indices[0] must be a 1-d int64 tensor"),
    ("gather index 2-d", lambda: ops.gather_channels([_x], [0], [_i.reshape(1, -1)]),
     ValueError, "indices[0] must be a 1-d int64 tensor"),
    ("gather scalar", lambda: ops.gather_channels([_x[0, 0, 0]], [0], [_i]), ValueError,
     "at least 1 dim"),
    ("gather range", lambda: ops.gather_channels([_x, _x], [0, 1], [_i, _i + 3]),
     RuntimeError, "indices[1] has entries outside [0, 4) (the size of dim 1 of tensors[1])"),
    ("gather negative", lambda: ops.gather_channels([_x], [2], [_i - 1]), RuntimeError,
     "indices[0] has entries outside [0, 5)"),
    ("gather bits dtype", lambda: ops.gather_channels(
        [torch.empty(3, 4, dtype=torch.bits8)], [0], [_i]), TypeError, "unsupported dtype"),
]


@pytest.mark.parametrize("name,call,exc,match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_argument_errors(name, call, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        call()


@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.pyobc.channel_dot(_x, _x[:2], 1), "same shape"),
    (lambda: torch.ops.pyobc.channel_dot(_x, _x.double(), 1), "same dtype"),
    (lambda: torch.ops.pyobc.channel_dot(_x.long(), _x.long(), 1), "float32"),
    (lambda: torch.ops.pyobc.channel_dot(_x, _x, -4), "out of range"),
    (lambda: torch.ops.pyobc.channel_dot(_x, _x, 0, True), "per_sample"),
    (lambda: torch.ops.pyobc.weight_channel_sums(_w, _w, 4), "does not divide"),
    (lambda: torch.ops.pyobc.weight_channel_sums(_w, _w, 0), "groups must be >= 1"),
    (lambda: torch.ops.pyobc.weight_channel_sums(_w[0, 0], _w[0, 0]), "at least 2 dims"),
    (lambda: torch.ops.pyobc.csr_gather_sum(_v, _rp, _col + 1), "col has entries outside"),
    (lambda: torch.ops.pyobc.csr_gather_sum(_v, _rp.int(), _col), "rowptr must be int64"),
    (lambda: torch.ops.pyobc.csr_gather_sum(_v, torch.tensor([0, 4, 2, 6]), _col),
     "non-decreasing"),
    (lambda: torch.ops.pyobc.csr_gather_sum(_v, _rp, _col, _v[0, :3]), "one entry per col"),
    (lambda: torch.ops.pyobc.csr_gather_reduce(_v, _rp, _col, "max"), "reduce must be"),
    (lambda: torch.ops.pyobc.csr_gather_reduce(_v, _rp, _col - 1, "amax"), "outside [0, 5)"),
    (lambda: torch.ops.pyobc.gather_channels([_x], [0, 1], [_i]), "same length"),
    (lambda: torch.ops.pyobc.gather_channels([_x], [3], [_i]), "out of range"),
    (lambda: torch.ops.pyobc.gather_channels([_x], [1], [_i + 2]), "entries outside [0, 4)"),
    (lambda: torch.ops.pyobc.gather_channels([_x], [1], [_i.int()]), "int64"),
])
def test_direct_op_calls_reject_bad_arguments(call, match):
    # the C++ checks (compiled) or the reference's checks (fallback): never a crash or garbage
    with pytest.raises((RuntimeError, ValueError, TypeError), match=re.escape(match)):
        call()


# ---------------------------------------------------------------------------------------------
# CUDA (only where a GPU is present)
# ---------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_cuda_channel_dot_matches_cpu(dtype):
    for shape, dim, per_sample, layout in CHANNEL_DOT_CASES + [
            ((64, 64, 32, 32), 1, False, "contiguous"),
            ((64, 64, 32, 32), 1, True, "channels_last"),
            ((16, 197, 192), -1, False, "contiguous"), ((16, 197, 192), -1, True, "contiguous"),
            ((3, 5, 17), 1, True, "contiguous"), ((2, 3, 33), 1, False, "sliced")]:
        a = make(shape, dtype, layout, seed=1, device="cuda")
        b = make(shape, dtype, layout, seed=2, device="cuda")
        want, abs_sum = expected_channel_dot(a.cpu(), b.cpu(), dim, per_sample)
        got = ops.channel_dot(a, b, dim, per_sample)
        assert got.device.type == "cuda"
        assert_close(got, want, abs_sum, dtype)
        torch.testing.assert_close(got.cpu(), ops.channel_dot(a.cpu(), b.cpu(), dim, per_sample),
                                   rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_cuda_weight_channel_sums_matches_cpu(dtype):
    for shape, groups, layout in WEIGHT_CASES + [((512, 256, 3, 3), 1, "contiguous"),
                                                 ((512, 1, 3, 3), 512, "contiguous"),
                                                 ((1000, 513), 1, "contiguous")]:
        w = make(shape, dtype, layout, seed=3, device="cuda")
        t = make(shape, dtype, layout, seed=4, device="cuda")
        (want_out, abs_out), (want_in, abs_in) = (
            expected_weight_sums(w.cpu(), t.cpu(), groups) if w.numel() < 100_000 else
            [(x.double(), x.double().abs() + 1) for x in _reference.weight_channel_sums(
                w.cpu(), t.cpu(), groups)])
        out_sums, in_sums = ops.weight_channel_sums(w, t, groups)
        assert out_sums.device.type == "cuda"
        assert_close(out_sums, want_out, abs_out, dtype)
        assert_close(in_sums, want_in, abs_in, dtype)


@needs_cuda
def test_cuda_empty_and_unaligned():
    base = torch.randn(1001, dtype=torch.float32, device="cuda")
    a, b = base[1:].view(10, 100), base[:-1].view(10, 100)  # 4-byte offset: no vector loads
    torch.testing.assert_close(ops.channel_dot(a, b, 1).cpu(),
                               ops.channel_dot(a.cpu(), b.cpu(), 1))
    e = torch.empty(0, 4, 3, dtype=torch.float32, device="cuda")
    assert not ops.channel_dot(e, e, 1).any()
    out_sums, in_sums = ops.weight_channel_sums(e, e)
    assert out_sums.shape == (0,) and in_sums.shape == (4,) and not in_sums.any()


@needs_cuda
@pytest.mark.parametrize("index", range(N_OPCHECK))
def test_cuda_opcheck(index):
    op, args = _opcheck_samples("cuda")[index]
    torch.library.opcheck(op, args)


def _random_csr(n_rows, n_cols, max_per_row, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_per_row + 1, (n_rows,), generator=gen)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    col = torch.randint(0, max(n_cols, 1), (int(rowptr[-1]),), generator=gen)
    return rowptr.to(device), col.to(device)


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_cuda_csr_ops_match_cpu(dtype):
    # short rows (thread per output) and long rows (warp per output); 1-d, 2-d, strided values
    for n_rows, n_cols, per_row, rows in [(7, 11, 3, None), (300, 1000, 4, 5), (40, 500, 90, 3),
                                          (5, 64, 200, None), (0, 4, 2, 2), (6, 0, 0, 2)]:
        rowptr, col = _random_csr(n_rows, n_cols, per_row, seed=n_rows)
        shape = (n_cols,) if rows is None else (rows, n_cols)
        for layout in ("contiguous", "transposed") if rows else ("contiguous",):
            v = make(shape, dtype, layout, seed=1)
            v.mul_((make(shape, torch.float32, layout, seed=3) > -0.6).to(dtype))  # some zeros
            w = make((col.numel(),), dtype, seed=2)
            vc, rc, cc, wc = v.cuda(), rowptr.cuda(), col.cuda(), w.cuda()
            pairs = [(ops.csr_gather_sum(vc, rc, cc), ops.csr_gather_sum(v, rowptr, col)),
                     (ops.csr_gather_sum(vc, rc, cc, wc), ops.csr_gather_sum(v, rowptr, col, w))]
            pairs += [(ops.csr_gather_reduce(vc, rc, cc, r),
                       ops.csr_gather_reduce(v, rowptr, col, r))
                      for r in ("amax", "count_nonzero", "mean_nonzero")]
            for got, want in pairs:
                assert got.device.type == "cuda" and got.dtype == dtype
                tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
                torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
            # deterministic: the same bits every call
            assert torch.equal(ops.csr_gather_sum(vc, rc, cc, wc),
                               ops.csr_gather_sum(vc, rc, cc, wc))


@needs_cuda
def test_cuda_csr_bad_indices():
    v = torch.randn(2, 5, device="cuda")
    rowptr, col = torch.tensor([0, 2, 3], device="cuda"), torch.tensor([0, 7, 1], device="cuda")
    with pytest.raises(RuntimeError, match=re.escape("col has entries outside [0, 5)")):
        ops.csr_gather_sum(v, rowptr, col)
    # unchecked: never an out-of-bounds read; the affected output is NaN, the others exact
    out = ops.csr_gather_sum(v, rowptr, col, check=False).cpu()
    assert out[:, 0].isnan().all() and torch.equal(out[:, 1], v[:, 1].cpu())
    out = ops.csr_gather_reduce(v, torch.tensor([0, 9, 3], device="cuda"),
                                torch.tensor([0, 1, 1], device="cuda"), "amax", check=False)
    assert out.isnan().all()


@needs_cuda
def test_cuda_gather_channels_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    tensors = [make((64, 32, 3, 3), seed=1), make((64,), seed=2),
               make((33, 17), layout="transposed", seed=3),
               make((8, 16, 5, 5), layout="channels_last", seed=4),
               torch.randint(-9, 9, (7, 5), generator=gen),
               torch.rand(6, 4, generator=gen) > 0.5,
               make((4, 6), seed=5).to(torch.complex128), make((10, 3), seed=6).half(),
               make((3, 1001), seed=7)[:, 1:],  # unaligned
               make((5, 0, 3), seed=8), make((512, 256, 3, 3), seed=9)]
    dims = [0, 0, 1, 0, -1, 1, 0, 1, -1, 2, 1]
    idx = [torch.randperm(64, generator=gen)[:40], torch.arange(0, 64, 2),
           torch.tensor([16, 0, 3]), torch.tensor([7, 7, 1]), torch.tensor([4, 0]),
           torch.tensor([], dtype=torch.long), torch.tensor([3, 1]), torch.tensor([2, 2, 0]),
           torch.arange(999, -1, -3), torch.tensor([1]), torch.randperm(256, generator=gen)[:128]]
    want = ops.gather_channels(tensors, dims, idx)
    got = ops.gather_channels([t.cuda() for t in tensors], dims, [i.cuda() for i in idx])
    for g, w in zip(got, want):
        assert g.device.type == "cuda" and g.is_contiguous() and torch.equal(g.cpu(), w)
    with pytest.raises(RuntimeError, match=re.escape("indices[1] has entries outside [0, 64)")):
        ops.gather_channels([t.cuda() for t in tensors[:2]], [0, 0],
                            [idx[0].cuda(), torch.tensor([0, 64], device="cuda")])
    # mixed devices: one call per device, results in order
    mixed = ops.gather_channels([tensors[0], tensors[1].cuda()], [0, 0], [idx[0], idx[1].cuda()])
    assert mixed[0].device.type == "cpu" and mixed[1].device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# pyobc.ops.second_order: lean convolution and eval-mode batch norm for double backward
# ---------------------------------------------------------------------------------------------

from pyobc.ops import second_order as _lean  # noqa: E402

_LEAN_CONVS = [  # (nd, in_shape, weight_shape, stride, padding, dilation, groups)
    (1, (2, 4, 11), (6, 2, 3), 2, 1, 1, 2),
    (2, (2, 3, 9, 8), (4, 3, 3, 3), 2, 1, 1, 1),
    (2, (2, 4, 10, 7), (4, 1, 3, 3), 1, 2, 2, 4),  # depthwise, dilated
    (2, (2, 3, 8, 8), (5, 3, 1, 1), 2, 0, 1, 1),  # strided 1x1 (even input: output_padding 1)
    (3, (1, 2, 5, 6, 5), (3, 2, 2, 3, 2), (1, 2, 2), (0, 1, 1), 1, 1),
]


def _second_derivatives(conv, x, w, b, args):
    """(y, dL/dx, d(<dL/dx, u>)/dx, d(<dL/dx, u>)/d(upstream)) of L = <r, conv(x)^2>: an
    input-dependent upstream gradient, so the double backward meets both of its terms."""
    torch.manual_seed(1)
    y = conv(x, w, b, *args)
    r = torch.randn_like(y)
    gx, = torch.autograd.grad((r * y * y).sum(), x, create_graph=True)
    u = torch.randn_like(gx)
    hx, = torch.autograd.grad((gx * u).sum(), x)
    return y, gx.detach(), hx


@pytest.mark.parametrize("case", _LEAN_CONVS)
def test_conv_input_only_matches_native_derivatives(case):
    nd, in_shape, w_shape, stride, padding, dilation, groups = case
    func = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(in_shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, generator=g)
    b = torch.randn(w_shape[0], dtype=torch.float64, generator=g)
    args = (stride, padding, dilation, groups)
    lean = _second_derivatives(lambda *a: _lean.conv_input_only(func, *a), x, w, b, args)
    native = _second_derivatives(func, x, w, b, args)
    for got, want in zip(lean, native):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradgradcheck(lambda t: _lean.conv_input_only(func, t, w, b, *args), (x,))


def test_conv_input_only_falls_back_when_weights_need_grad():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = _lean.conv_input_only(torch.nn.functional.conv2d, x, w, None, 1, 1)
    assert "ConvolutionBackward" in type(y.grad_fn).__name__  # the native node: weight grads flow
    gw, = torch.autograd.grad(y.sum(), w)
    torch.testing.assert_close(gw, torch.autograd.grad(torch.nn.functional.conv2d(x, w, None, 1, 1).sum(), w)[0])


def test_conv_input_only_skips_the_weight_term_of_double_backward():
    """The point of the op: the second pass runs one convolution per layer, not two."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 3, 3, 3)

    def convolutions(conv):
        with torch.profiler.profile() as prof:
            h = conv(x, w, None, 1, 1).relu()
            y = conv(h, w, None, 1, 1)
            gx, = torch.autograd.grad((y * y).sum(), x, create_graph=True)
            torch.autograd.grad(gx.sum(), x)
        # every convolution-sized kernel: forward-like ones and backward ones
        return sum(e.name in ("aten::_convolution", "aten::convolution_backward") for e in prof.events())

    native = convolutions(torch.nn.functional.conv2d)
    lean = convolutions(lambda *a: _lean.conv_input_only(torch.nn.functional.conv2d, *a))
    assert (lean, native) == (8, 10)  # 2 forward + 2 backward + 4 vs 6 in the double backward


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_batch_norm_eval_matches_native(shape):
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    mean, var = torch.randn(c, dtype=torch.float64, generator=g), torch.rand(c, dtype=torch.float64, generator=g) + 0.1
    w = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True)

    def derivatives(bn):
        y = bn(x, mean, var, w, b, False, 0.1, 1e-3)
        grads = torch.autograd.grad((y.sin()).sum(), (x, w, b), create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in grads), (x, w, b))
        return (y,) + grads + second

    for got, want in zip(derivatives(_lean.batch_norm_eval), derivatives(torch.nn.functional.batch_norm)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # training mode is the native op (batch statistics)
    torch.testing.assert_close(_lean.batch_norm_eval(x, None, None, w, b, True),
                               torch.nn.functional.batch_norm(x, None, None, w, b, True))



# ---------------------------------------------------------------------------------------------
# channel_scale: x * scale broadcast along a channel dim (channel_dot's adjoint)
# ---------------------------------------------------------------------------------------------

CHANNEL_SCALE_CASES = [  # (shape, dim, per_sample, layout)
    ((7,), 0, False, "contiguous"),
    ((4, 6, 5, 3), 1, False, "contiguous"),
    ((4, 6, 5, 3), 1, True, "contiguous"),
    ((4, 6, 5, 3), 1, True, "channels_last"),
    ((4, 6, 5, 3), -1, False, "transposed"),
    ((3, 7, 8), -1, True, "contiguous"),
    ((3, 7, 8), 1, False, "sliced"),
    ((3, 7, 8), 2, True, "expanded"),
    ((64, 33, 17), 1, False, "contiguous"),  # rows split across tasks
    ((0, 4, 3), 1, True, "contiguous"),
]


def _scale_for(x, dim, per_sample, seed):
    d = dim % x.dim()
    return make((x.shape[0], x.shape[d]) if per_sample else (x.shape[d],), x.dtype, seed=seed,
                device=x.device)


def _expected_scale(x, s, dim, per_sample):
    """The product in float64, rounded once: exact for every supported dtype (a product of two
    float32 values rounds the same way from float64; 16-bit products are exact in float32)."""
    shape = [1] * x.dim()
    shape[dim % x.dim()] = x.shape[dim]
    if per_sample:
        shape[0] = x.shape[0]
    return (x.double() * s.double().reshape(shape)).to(x.dtype)


@pytest.mark.parametrize("case", CHANNEL_SCALE_CASES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_channel_scale_matches_float64_product(case, dtype):
    shape, dim, per_sample, layout = case
    x = make(shape, dtype, layout, seed=1)
    s = _scale_for(x, dim, per_sample, seed=2)
    got = ops.channel_scale(x, s, dim, per_sample)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, _expected_scale(x, s, dim, per_sample), rtol=0, atol=0)
    if layout in ("contiguous", "channels_last", "transposed"):  # dense: x's strides are kept
        assert got.stride() == x.stride()


def test_channel_scale_gradients():
    x = make((3, 4, 5), torch.float64, seed=1).requires_grad_()
    s = make((3, 4), torch.float64, seed=2).requires_grad_()
    s1 = make((5,), torch.float64, seed=3).requires_grad_()
    for f, args in ((lambda a, b: ops.channel_scale(a, b, 1, True), (x, s)),
                    (lambda a, b: ops.channel_scale(a, b, -1), (x, s1)),
                    (lambda a, b: ops.channel_dot(a, b, 1, True), (x, make((3, 4, 5), torch.float64, seed=4).requires_grad_()))):
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


def test_channel_scale_falls_back_to_torch_where_the_op_has_no_formulas():
    """Forward-mode AD and mixed dtypes: the same product through torch's broadcast multiply."""
    x, s = make((2, 3, 4), seed=1), make((3,), seed=2)
    with torch.autograd.forward_ad.dual_level():
        xd = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(ops.channel_scale(xd, s, 1)).tangent
    torch.testing.assert_close(tangent, s.view(1, 3, 1).expand_as(x), rtol=0, atol=0)
    mixed = ops.channel_scale(x.bfloat16(), s, 1)  # float32 scale: promoted like torch's multiply
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, x.bfloat16().float() * s.view(1, 3, 1))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.pyobc.channel_scale(x.double(), s, 1)


def test_forward_mode_tangents_are_carried_not_dropped():
    """An input with a forward-mode tangent goes through the reference's torch ops (torch's custom-op
    autograd layer would return no tangent at all); plain inputs inside a dual level give plain values."""
    fa = torch.autograd.forward_ad
    a, b = make((2, 3, 4), torch.float64, seed=1), make((2, 3, 4), torch.float64, seed=2)
    ta, tb = make((2, 3, 4), torch.float64, seed=3), make((2, 3, 4), torch.float64, seed=4)
    w, tw = make((5, 3, 2), torch.float64, seed=5), make((5, 3, 2), torch.float64, seed=6)
    with fa.dual_level():
        out = ops.channel_dot(fa.make_dual(a, ta), fa.make_dual(b, tb), 1, True)
        value, tangent = fa.unpack_dual(out)
        torch.testing.assert_close(value, (a * b).sum(2))
        torch.testing.assert_close(tangent, (ta * b + a * tb).sum(2))
        sums = ops.weight_channel_sums(fa.make_dual(w, tw), w, 1)
        torch.testing.assert_close(fa.unpack_dual(sums[0]).tangent, (tw * w).sum((1, 2)))
        plain = ops.channel_dot(a, b, 1)
        assert fa.unpack_dual(plain).tangent is None
        torch.testing.assert_close(plain, (a * b).sum((0, 2)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.channel_scale(torch.randn(2, 3), torch.randn(2), 1), ValueError, "shape"),
    (lambda: ops.channel_scale(torch.randn(2, 3), torch.randn(3), 2), ValueError, "out of range"),
    (lambda: ops.channel_scale(torch.randn(2, 3), torch.randn(3), 0, True), ValueError, "per_sample"),
    (lambda: ops.channel_scale(torch.randn(2, 3), torch.randn(3), 1, True), ValueError, "shape"),
    (lambda: ops.channel_scale(torch.arange(6).view(2, 3), torch.ones(3, dtype=torch.long), 1), TypeError,
     "float32"),
    (lambda: ops.channel_scale([1.0], torch.randn(1), 0), TypeError, "torch.Tensor"),
    (lambda: ops.channel_scale(torch.randn(2, 3), torch.randn(3), 1.0), TypeError, "dim"),
])
def test_channel_scale_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_channel_scale_torch_compile_fullgraph():
    f = torch.compile(lambda a, b: ops.channel_scale(a, b, 1, True) * 2, fullgraph=True, backend="eager")
    x, s = make((2, 3, 4), seed=1), make((2, 3), seed=2)
    torch.testing.assert_close(f(x, s), _expected_scale(x, s, 1, True) * 2)


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_cuda_channel_scale_matches_cpu(dtype):
    for shape, dim, per_sample, layout in CHANNEL_SCALE_CASES + [((64, 64, 32, 32), 1, True, "channels_last")]:
        x = make(shape, dtype, layout, seed=1, device="cuda")
        s = _scale_for(x, dim, per_sample, seed=2)
        got = ops.channel_scale(x, s, dim, per_sample)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), _expected_scale(x.cpu(), s.cpu(), dim, per_sample), rtol=0, atol=0)


@needs_cuda
def test_cuda_channel_scale_gradgradcheck():
    x = make((3, 4, 5), torch.float64, seed=1, device="cuda").requires_grad_()
    s = make((3, 4), torch.float64, seed=2, device="cuda").requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: ops.channel_scale(a, b, 1, True), (x, s))
