"""pyobc.save / pyobc.load: the pruning plan replayed on a fresh model reproduces the pruned model."""
from __future__ import annotations

import pytest
import torch

import pyobc
from pyobc.pruning.plan import plan_of
from prune_testing import ZOO, assert_consistent, build, inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(name):
    return pyobc.models.get(name, in_channels=1, input_size=8, **ZOO[name]).eval()


def random_scores(model, x, seed):
    s = pyobc.score(model, None, "magnitude", example_inputs=x)
    g = torch.Generator().manual_seed(seed)
    s.values = [torch.rand(v.shape, generator=g) for v in s.values]
    return s


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "vit_tiny", "mlp"])
def test_round_trip_after_successive_prunes(name, tmp_path):
    model = build(name)
    x = inputs(3)
    once, _ = pyobc.prune(model, random_scores(model, x, 1), 0.3, example_inputs=x)
    twice, _ = pyobc.prune(once, random_scores(once, x, 2), 0.3, scope="local")  # no inputs: stored records
    assert len(plan_of(once)) == 1 and len(plan_of(twice)) == 2  # plans accumulate
    path = tmp_path / "pruned.pt"
    pyobc.save(twice, path)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == "pyobc.pruned/1" and len(raw["plan"]) == 2
    loaded = pyobc.load(fresh(name), path)
    assert_consistent(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), twice(x))
    assert len(plan_of(loaded)) == 2
    # loading again and pruning further keeps accumulating
    thrice, _ = pyobc.prune(loaded, random_scores(loaded, x, 3), 0.2)
    assert len(plan_of(thrice)) == 3


def test_replay_rebuilds_groups_from_given_inputs(tmp_path):
    model = build("resnet20")
    x = inputs()
    pruned, _ = pyobc.prune(model, random_scores(model, x, 4), 0.5)  # no example inputs in the plan
    assert plan_of(pruned)[0]["example_inputs"] is None
    pyobc.save(pruned, tmp_path / "p.pt")
    loaded = pyobc.load(fresh("resnet20"), tmp_path / "p.pt", example_inputs=x)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_load_errors(tmp_path):
    model = build("resnet20")
    x = inputs()
    pruned, _ = pyobc.prune(model, random_scores(model, x, 5), 0.5, example_inputs=x)
    path = tmp_path / "p.pt"
    pyobc.save(pruned, path)
    wrong = pyobc.models.resnet20(in_channels=1, input_size=8, width=0.5)
    with pytest.raises(ValueError, match="not the one the pruning plan was recorded on"):
        pyobc.load(wrong, path)
    with pytest.raises(ValueError, match="freshly built"):
        pyobc.load(pruned, path)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by pyobc.save"):
        pyobc.load(fresh("resnet20"), tmp_path / "other.pt")
    adapted = pyobc.equivalent_prune(model, random_scores(model, x, 6), 0.5)
    with pytest.raises(ValueError, match="fold"):
        pyobc.save(adapted, tmp_path / "a.pt")
    pyobc.save(pyobc.fold(adapted), tmp_path / "a.pt")
