"""pyobc.TorchPruningImportance inside Torch-Pruning's BasePruner: same ranking as pyobc.score, the same
pruned model as pyobc.prune, lazy scoring and re-scoring between iterative steps."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pyobc
from prune_testing import assert_consistent, build

pytestmark = pytest.mark.usefixtures("one_thread")

tp = pytest.importorskip("torch_pruning")


class Recording(pyobc.TorchPruningImportance):
    """Keeps what it returned, by root layer name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.returned = {}

    def __call__(self, group):
        out = super().__call__(group)
        names = {id(m): n for n, m in self.model_of(group).named_modules()}
        self.returned[names[id(group[0].dep.target.module)]] = out
        return out

    def model_of(self, group):
        return group._DG.model


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))]


def head_of(name, model):
    return {"resnet20": lambda: model.fc, "vgg11": lambda: model.classifier[2], "vit_tiny": lambda: model.head}[name]()


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "vit_tiny"])
def test_same_ranking_as_pyobc_score(name):
    model = build(name)
    loader = data()
    reference = pyobc.score(copy.deepcopy(model), loader, "jacobian").by_module()
    imp = Recording("jacobian", loader)
    assert imp.scorings == 0  # lazy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(model, loader[0][0][:2], importance=imp, pruning_ratio=0.5,
                                      ignored_layers=[head_of(name, model)])
        pruner.step()
    assert imp.scorings == 1
    assert set(imp.returned) == set(reference)
    for root, values in reference.items():
        assert torch.allclose(imp.returned[root], values.float())
        assert torch.equal(torch.argsort(imp.returned[root], stable=True), torch.argsort(values, stable=True))
    assert model(loader[0][0]).shape == (16, 10)
    assert_consistent(model)


def test_tp_pruning_matches_pyobc_prune_and_rescores():
    model = build("resnet20")
    loader = data()
    x = loader[0][0]
    scores = pyobc.score(model, loader, "jacobian")
    ours, _ = pyobc.prune(model, scores, 0.5, scope="local")
    imp = pyobc.TorchPruningImportance("jacobian", loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(model, x[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc])
        pruner.step()
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)  # the same channels were removed
    # iterative pruning: every step re-scores the pruned model
    model = build("resnet20")
    imp = pyobc.TorchPruningImportance("taylor", loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(model, x[:2], importance=imp, pruning_ratio=0.5, iterative_steps=2,
                                      ignored_layers=[model.fc])
        pruner.step()
        assert imp.scorings == 1
        pruner.step()
    assert imp.scorings == 2
    assert imp.scores.signature["conv1.weight"][0] == 3  # the second scoring saw the once-pruned model
    assert model.conv1.out_channels == 2 and model(x).shape == (16, 10)
