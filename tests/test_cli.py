"""The ``pyobc`` command line, run as users run it: the installed console script in a subprocess.

Models and data come from ``tests/cli_entry.py`` (a tiny CNN, seeded random batches), so only
``demo --quick`` trains anything; the zoo cache goes to a temporary folder (``PYOBC_CACHE``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyobc

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ["--model", "tests.cli_entry:build_model", "--data", "tests.cli_entry:build_loader"]
# the console script is what users run; `python -m pyobc` only when it is not on PATH
PYOBC = [shutil.which("pyobc")] if shutil.which("pyobc") else [sys.executable, "-m", "pyobc"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pyobc-cache")


def run(args, cache_dir: Path, *, timeout: float = 300, extra_env: dict | None = None, cwd: Path = ROOT):
    """Run ``pyobc *args`` from the repository root (so ``tests.cli_entry`` imports); returns the result."""
    env = dict(os.environ, PYOBC_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    env.pop("PYOBC_TRACEBACK", None)
    env.update(extra_env or {})
    return subprocess.run(PYOBC + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyobc: error:"), result.stderr
    assert "Traceback" not in result.stderr


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- demo ------------------------------------------------------------------------------------------------------

def test_demo_quick_prints_every_method(cache):
    result = run(["demo", "--quick"], cache, timeout=240)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "trained now" in out  # the cache was empty: the quick model was trained in this run
    table = out[out.index("(unpruned)"):]
    from pyobc.demo import default_methods

    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.strip()}
    for method in default_methods() + ["jacobian+EP"]:
        assert method in rows, f"{method} missing from\n{table}"
    assert "oracle" not in rows
    for col in ("score time (s)", "x fwd+bwd / batch", "params after", "MACs after", "acc pruned",
                "acc pruned + reconstructed", "acc fine-tuned"):
        assert col in out
    # every fine-tuned accuracy is a percentage
    assert all(rows[m][-1].endswith("%") for m in default_methods())


# -- score and prune on entry points ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scores_file(cache, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scores") / "scores.pt"
    result = run(["score", *ENTRY, "--method", "oba", "--max-batches", "2", "--output", path], cache)
    assert result.returncode == 0, result.stderr
    assert "Scores(method='oba'" in result.stdout
    return path


def test_score_writes_a_loadable_scores_file(scores_file):
    raw = torch.load(scores_file, weights_only=True)
    assert raw["method"] == "oba"
    scores = pyobc.Scores.load(scores_file)
    assert scores.method == "oba" and scores.batches == 2
    from cli_entry import build_model

    convs = {n: m.out_channels for n, m in build_model().named_modules() if isinstance(m, torch.nn.Conv2d)}
    for root, values in scores.by_module().items():
        if root in convs:
            assert values.numel() == convs[root]


def test_score_json_with_a_file_entry_point_and_custom_loss(cache, tmp_path):
    result = run(["score", "--model", "tests/cli_entry.py:build_model", "--data", "tests/cli_entry.py:build_loader",
                  "--loss", "tests.cli_entry:mean_loss", "--method", "taylor", "--max-batches", "all", "--json"],
                 cache)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["method"] == "taylor" and data["batches"] == 4 and data["samples"] == 64
    assert {layer["root"] for layer in data["layers"]} == set(data["scores"])
    assert sum(len(v) for v in data["scores"].values()) == data["channels"]


def test_prune_from_scores_file_saves_a_loadable_smaller_model(cache, scores_file, tmp_path):
    out = tmp_path / "pruned.pt"
    result = run(["prune", *ENTRY, "--scores", scores_file, "--ratio", "0.5", "--target", "macs", "--output", out],
                 cache)
    assert result.returncode == 0, result.stderr
    assert "| MACs/sample |" in result.stdout and "pyobc.load(build_model()" in result.stdout
    from cli_entry import build_loader, build_model

    original = build_model()
    loaded = pyobc.load(build_model(), out)
    x, _ = next(iter(build_loader()))
    assert loaded.eval()(x).shape == original.eval()(x).shape
    assert n_params(loaded) < n_params(original)


def test_prune_scores_now_with_json(cache, tmp_path):
    out = tmp_path / "pruned.pt"
    result = run(["prune", *ENTRY, "--method", "jacobian", "--max-batches", "2", "--ratio", "0.3",
                  "--output", out, "--json"], cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "jacobian" and report["scope"] == "global" and report["target"] == "channels"
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["channels_after"] == sum(layer["kept"] for layer in report["layers"])
    from cli_entry import build_model

    assert n_params(pyobc.load(build_model(), out)) == report["params_after"]


def test_prune_with_reconstruction_json(cache, tmp_path):
    out = tmp_path / "pruned.pt"
    result = run(["prune", *ENTRY, "--method", "taylor", "--max-batches", "2", "--ratio", "0.4", "--reconstruct",
                  "--selection", "scores*obs", "--output", out, "--json"], cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rec = report["reconstruction"]
    assert report["method"] == "taylor*obs" and rec["layers"] and rec["passes"] > 0
    assert all(f["error_after"] <= f["error_before"] * (1 + 1e-6) + 1e-9 for f in rec["layers"])
    from cli_entry import build_model

    assert n_params(pyobc.load(build_model(), out)) == report["params_after"]
    bad = run(["prune", *ENTRY, "--ratio", "0.4", "--selection", "obs"], cache)
    assert_one_line_error(bad)
    assert "--reconstruct" in bad.stderr or "reconstruct=" in bad.stderr


# -- compare ---------------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_table_and_valid_pngs(cache, tmp_path):
    plt_image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "cmp"
    result = run(["compare", *ENTRY, "--methods", "magnitude", "jacobian", "--ratios", "0.2", "0.5",
                  "--max-batches", "2", "--output-dir", out, "--format", "md"], cache)
    assert result.returncode == 0, result.stderr
    for name in ("accuracy_vs_macs.png", "layer_profile.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        image = plt_image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
    table = (out / "compare.md").read_text().splitlines()
    assert table[0].startswith("| method |") and len(table) == 2 + 1 + 2 * 2


def test_compare_no_plot_writes_csv_rows(cache, tmp_path):
    import csv

    out = tmp_path / "cmp"
    result = run(["compare", *ENTRY, "--methods", "magnitude", "taylor", "--ratios", "0.1", "0.4",
                  "--max-batches", "1", "--output-dir", out, "--no-plot", "--json"], cache)
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*.png"))
    with open(out / "compare.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["target_ratio"]) for r in rows] == [
        ("(unpruned)", "0"), ("magnitude", "0.1"), ("magnitude", "0.4"), ("taylor", "0.1"), ("taylor", "0.4")]
    for r in rows[1:]:
        assert 0.0 < float(r["macs_removed"]) < 1.0 and 0.0 <= float(r["accuracy"]) <= 1.0
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 4 and data["profile_ratio"] == 0.4
    with open(out / "layer_profile.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["layer", "channels", "magnitude", "taylor"]


def test_compare_reconstruct_adds_the_column(cache, tmp_path):
    import csv

    out = tmp_path / "cmp"
    result = run(["compare", *ENTRY, "--methods", "taylor", "--ratios", "0.4", "--max-batches", "2",
                  "--reconstruct", "--output-dir", out, "--no-plot"], cache)
    assert result.returncode == 0, result.stderr
    with open(out / "compare.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["reconstructed_accuracy"] == ""
    assert 0.0 <= float(rows[1]["reconstructed_accuracy"]) <= 1.0


def test_compare_without_matplotlib_writes_table_then_fails_clearly(cache, tmp_path):
    # a matplotlib that cannot be imported, first on the path
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib is hidden by the test')\n")
    out = tmp_path / "cmp"
    result = run(["compare", *ENTRY, "--methods", "magnitude", "--ratios", "0.3", "--output-dir", out], cache,
                 extra_env={"PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])})
    assert_one_line_error(result)
    assert "pip install matplotlib" in result.stderr
    assert (out / "compare.csv").is_file()


# -- errors, help, info, bench ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    pytest.param(["score", "--model", "no_such_module:build", "--data", "tests.cli_entry:build_loader"],
                 id="module-not-found"),
    pytest.param(["score", "--model", "tests.cli_entry:missing", "--data", "tests.cli_entry:build_loader"],
                 id="attribute-missing"),
    pytest.param(["score", "--model", "tests.cli_entry:not_a_model", "--data", "tests.cli_entry:build_loader"],
                 id="not-a-module"),
    pytest.param(["prune", *ENTRY, "--scores", "does/not/exist.pt"], id="missing-scores-file"),
    pytest.param(["score", *ENTRY, "--method", "no-such-method"], id="unknown-method"),
    pytest.param(["prune", *ENTRY, "--ratio", "1.5"], id="bad-ratio"),
])
def test_user_errors_are_one_line(cache, args):
    assert_one_line_error(run(args, cache))


@pytest.mark.parametrize("command", ["demo", "score", "prune", "compare", "info", "bench"])
def test_help_has_examples(cache, command):
    result = run([command, "--help"], cache)
    assert result.returncode == 0 and "Examples:" in result.stdout and f"pyobc {command}" in result.stdout


def test_info_and_bench_json(cache):
    info = run(["info", "--json"], cache)
    assert info.returncode == 0, info.stderr
    assert "jacobian" in json.loads(info.stdout)["criteria"]
    bench = run(["bench", "--quick", "--repeats", "2", "--json"], cache)
    assert bench.returncode == 0, bench.stderr
    data = json.loads(bench.stdout)
    if data["compiled"]:
        assert {r["op"] for r in data["results"]} == set(pyobc.ops.backend_report()["ops"])
        assert all(r["ratio"] > 0 for r in data["results"])
    else:
        assert data["reason"] and data["results"] == []
