"""Data-parallel scoring (issue #7): two Gloo processes on CPU against one process over the same batches.

Three ``torch.distributed.run --nproc_per_node=2`` jobs of ``tests/dist_worker.py`` run at once (process
start-up dominates): ``equal`` scores every criterion on two shards, ``mismatch`` and ``empty`` must
end in the same clear error on both ranks with a non-zero exit, not a hang.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyobc
from pyobc.distributed import (ConfigMismatchError, EmptyShardError, PeerFailedError, ShardSampler, _verdict,
                               sharded_loader)

import dist_worker as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT = 300  # seconds for all three jobs together; a hang fails the test instead of blocking it
#: what the equal job writes (see dist_worker.run_equal): CASES, a DDP-wrapped model, an explicit process
#: group, tiny all-reduce buckets
ALL_CASES = W.CASES + [("ddp", "jacobian", {}, "channel"), ("group", "obd", {}, "channel"),
                       ("buckets", "oba", {"hessian": "full"}, "weight")]


def _launch(mode: str, outdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), mode,
           str(outdir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    dirs = {mode: tmp_path_factory.mktemp(mode) for mode in ("equal", "mismatch", "empty")}
    procs = {mode: _launch(mode, d) for mode, d in dirs.items()}
    deadline = time.monotonic() + TIMEOUT
    results = {}
    try:
        for _, method, options, granularity in ALL_CASES + [("local", "taylor", {}, "channel")]:
            _reference(method, options, granularity)  # the references, while the workers start up
        for mode, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                results[mode] = (None, out, dirs[mode])
                continue
            results[mode] = (proc.returncode, out, dirs[mode])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return results


def _job(jobs, mode: str, ok: bool):
    rc, out, outdir = jobs[mode]
    if rc is None:
        pytest.fail(f"the {mode!r} job hung (killed after {TIMEOUT} s):\n{out[-4000:]}")
    if ok and rc != 0:
        pytest.fail(f"the {mode!r} job failed with exit code {rc}:\n{out[-4000:]}")
    if not ok and rc == 0:
        pytest.fail(f"the {mode!r} job should have failed:\n{out[-4000:]}")
    return out, outdir


# ---------------------------------------------------------------------------------------------------
# comparing scores


def _flat(s: pyobc.Scores) -> dict[str, object]:
    """Every number a Scores holds, by a path name."""
    out: dict[str, object] = {"batches": s.batches, "samples": s.samples, "method": s.method}
    for g, v in zip(s.groups, s.values):
        out[f"values/{g.root}"] = v
    for n, t in (s.parameter_scores or {}).items():
        out[f"parameter/{n}"] = t

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        else:
            out[prefix] = obj
    walk("extras", s.extras)
    return out


def _assert_same(a: pyobc.Scores, b: pyobc.Scores, rtol: float | None) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k, va in fa.items():
        vb = fb[k]
        if isinstance(va, torch.Tensor):
            if rtol is None:
                assert torch.equal(va, vb), k
            else:
                scale = float(vb.abs().max()) if vb.numel() else 0.0
                torch.testing.assert_close(va, vb, rtol=rtol, atol=rtol * scale + 1e-300, msg=k)
        else:
            assert va == vb, k


def _load(outdir: Path, label: str) -> list[pyobc.Scores]:
    return [pyobc.Scores.load(outdir / f"{label}.rank{r}.pt") for r in range(2)]


_REFS: dict[tuple, pyobc.Scores] = {}


def _reference(method: str, options: dict, granularity: str) -> pyobc.Scores:
    """Single process over the union of both ranks' batches (cached per case)."""
    key = (method, tuple(sorted(options.items())), granularity)
    if key not in _REFS:
        old = torch.get_default_dtype()
        torch.set_default_dtype(W.DTYPE)  # as in the workers, whatever other test modules left behind
        try:
            _REFS[key] = pyobc.score(W.make_model(), W.shard_batches(2), method, granularity=granularity, **options)
        finally:
            torch.set_default_dtype(old)
    return _REFS[key]


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c[0])
def test_two_ranks_equal_one_process_over_the_same_batches(jobs, case):
    _, outdir = _job(jobs, "equal", ok=True)
    label, method, options, granularity = case
    r0, r1 = _load(outdir, label)
    _assert_same(r0, r1, rtol=None)  # every rank holds bit-identical scores
    ref = _reference(method, options, granularity)
    _assert_same(r0, ref, rtol=1e-9)
    n = len(W.make_dataset())
    if method != "magnitude":
        assert (r0.samples, r0.batches) == (n, len(W.shard_batches(2)))


def test_prune_gives_the_same_model_on_every_rank(jobs):
    _, outdir = _job(jobs, "equal", ok=True)
    states = [torch.load(outdir / f"pruned.rank{r}.pt", weights_only=True) for r in range(2)]
    old = torch.get_default_dtype()
    torch.set_default_dtype(W.DTYPE)
    try:
        want, _ = pyobc.prune(W.make_model(), _reference("oba", {}, "channel"), 0.5)
    finally:
        torch.set_default_dtype(old)
    want = want.state_dict()
    assert want["stem.weight"].shape[0] < W.make_model().stem.weight.shape[0]  # something was removed
    for state in states:
        assert state.keys() == want.keys()
        for k, v in want.items():
            assert state[k].shape == v.shape, k
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_opt_out_scores_each_rank_alone(jobs):
    _, outdir = _job(jobs, "equal", ok=True)
    r0, r1 = _load(outdir, "local")
    ref = _reference("taylor", {}, "channel")
    _assert_same(r0, ref, rtol=1e-9)
    _assert_same(r1, ref, rtol=1e-9)
    assert r0.samples == len(W.make_dataset())  # each rank saw everything, nothing was summed


def test_unsharded_loader_warns_on_rank_zero(jobs):
    _, outdir = _job(jobs, "equal", ok=True)
    w0 = json.loads((outdir / "warnings.rank0.json").read_text())
    w1 = json.loads((outdir / "warnings.rank1.json").read_text())
    assert any("same first batch" in m for m in w0), w0
    assert not any("same first batch" in m for m in w1), w1


def _records(outdir: Path) -> list[dict[str, dict]]:
    out = []
    for r in range(2):
        rows = [json.loads(line) for line in (outdir / f"errors.rank{r}.jsonl").read_text().splitlines()]
        out.append({row["scenario"]: row for row in rows})
    return out


def test_mismatches_raise_the_same_error_on_every_rank(jobs):
    out, outdir = _job(jobs, "mismatch", ok=False)
    rec = _records(outdir)
    for scenario, needle in [("options", "delta=0.0 on rank 0; delta=0.1 on rank 1"),
                             ("model", "ranks disagree on the model"),
                             ("weights", "ranks disagree on the model's weights"),
                             ("method", "ranks disagree on the method: jacobian on rank 0; obd on rank 1")]:
        e0, e1 = rec[0][scenario], rec[1][scenario]
        assert e0["type"] == e1["type"] == "ConfigMismatchError", (scenario, e0, e1)
        assert "ValueError" in e0["mro"]
        assert e0["message"] == e1["message"] and needle in e0["message"], (scenario, e0["message"])
    # a rank that fails raises its own error; the other one says which rank failed and why
    assert rec[1]["failure"]["type"] == "TypeError"
    assert rec[0]["failure"]["type"] == "PeerFailedError"
    assert "rank 1" in rec[0]["failure"]["message"] and "bogus" in rec[0]["failure"]["message"]
    # the last one is left uncaught: a traceback naming it on both ranks, and a non-zero exit
    assert out.count("ConfigMismatchError: pyobc.score: ranks disagree on the method") >= 1


def test_empty_shard_raises_on_every_rank(jobs):
    out, outdir = _job(jobs, "empty", ok=False)
    rec = _records(outdir)
    e0, e1 = rec[0]["empty"], rec[1]["empty"]
    assert e0["type"] == e1["type"] == "EmptyShardError"
    assert e0["message"] == e1["message"] and "rank 1 (of 2) yielded no batches" in e0["message"]
    assert "EmptyShardError" in out


# ---------------------------------------------------------------------------------------------------
# in-process pieces


@pytest.mark.parametrize("shuffle", [False, True])
def test_sharded_loader_partitions_the_dataset(shuffle):
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    seen = []
    sizes = []
    for rank in range(3):
        loader = sharded_loader(ds, 3, shuffle=shuffle, num_replicas=3, rank=rank)
        got = [int(i) for (b,) in loader for i in b]
        assert len(loader.sampler) == len(got)
        sizes.append(len(got))
        seen += got
    assert sorted(seen) == list(range(10))  # no sample padded in or dropped
    assert sizes == [4, 3, 3]
    assert [int(i) for (b,) in sharded_loader(ds, 3, drop_last=True, num_replicas=3, rank=0) for i in b] == [0, 3, 6]
    assert isinstance(sharded_loader(ds, 2).sampler, ShardSampler)  # no process group: the whole dataset
    assert len(sharded_loader(ds, 2).sampler) == 10
    with pytest.raises(TypeError, match="sampler"):
        sharded_loader(ds, 2, sampler=None)
    with pytest.raises(ValueError, match="rank"):
        sharded_loader(ds, 2, num_replicas=2, rank=2)


def test_distributed_argument():
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert not pyobc.distributed.is_active()
    assert pyobc.score(net, [batch], "obd", distributed=False).samples == 5
    with pytest.raises(RuntimeError, match="init_process_group"):
        pyobc.score(net, [batch], "obd", distributed=True)
    with pytest.raises(TypeError, match="distributed must be"):
        pyobc.score(net, [batch], "obd", distributed="yes")
    with pytest.raises(ValueError, match="no batches"):
        pyobc.score(net, [], "obd")


def _desc(**kw):
    d = {"status": "ok", "method": "obd", "granularity": "channel", "options": {}, "loss_fn": "f", "model": "m",
         "device_type": "cpu", "weights": [1.0, 2.0, 3.0], "groups": "g", "acc": [("F:w", (3,), "float64")],
         "batches": 1, "samples": 2, "data": None}
    d.update(kw)
    return d


def test_verdict():
    assert _verdict([_desc(), _desc(acc=[])], 0) is None  # a key one rank lacks is zeros there
    assert _verdict([_desc(), _desc(weights=[1.0 + 1e-12, 2.0, 3.0])], 0) is None  # rounding is not a mismatch
    e = _verdict([_desc(), _desc(weights=[1.1, 2.0, 3.0])], 1)
    assert isinstance(e, ConfigMismatchError) and "weights" in str(e)
    e = _verdict([_desc(), _desc(acc=[("F:w", (4,), "float64")])], 0)
    assert isinstance(e, ConfigMismatchError) and "'F:w'" in str(e)
    e = _verdict([_desc(options={"a": "1"}), _desc(options={"a": "1", "b": "2"}), _desc(options={"a": "2"})], 2)
    assert "a=1, b=<unset> on rank 0; a=1, b=2 on rank 1; a=2, b=<unset> on rank 2" in str(e)
    failed = [_desc(), {"status": "empty", "error": "x"}, {"status": "empty", "error": "x"}, _desc()]
    e = _verdict(failed, 0)
    assert isinstance(e, EmptyShardError) and "ranks 1-2 (of 4)" in str(e)
    failed[2] = {"status": "error", "error": "KeyError: 'k'"}
    assert _verdict(failed, 2) is None  # the failing rank re-raises its own error
    e = _verdict(failed, 1)
    assert isinstance(e, PeerFailedError) and "rank 2: KeyError: 'k'" in str(e)
