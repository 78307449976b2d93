"""Equivalent Pruning (Optimal Brain Connection): adapters reproduce naive pruning at initialisation, and
folding reproduces the trained adapter model exactly (up to float rounding) as a plain pruned network."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
from pyobc.pruning.counting import tensor_shapes
from pyobc.pruning.equivalent import OBCAdapted, qualifies
from prune_testing import ZOO, assert_consistent, build, inputs

pytestmark = pytest.mark.usefixtures("one_thread")


#: which group roots get adapters (the channel dimension is internal to them)
ADAPTED = {
    "resnet20": lambda root: root.startswith("layer") and root.endswith("conv1"),  # conv1 -> bn1 -> relu -> conv2
    "vgg11": lambda root: True,  # every conv, and the hidden classifier layer
    "vit_tiny": lambda root: root.endswith("fc1"),  # fc1 -> GELU -> fc2
    "mlp": lambda root: True,
}


def data(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(ADAPTED))
def test_adapters_then_fold(name, tmp_path):
    model = build(name)
    x, y = data()
    scores = pyobc.score(model, [(x, y)], "jacobian")
    assert {g.root for g in scores.groups if qualifies(model, g) is None} == \
        {g.root for g in scores.groups if ADAPTED[name](g.root)}
    adapted = pyobc.equivalent_prune(model, scores, 0.5, example_inputs=x[:2])
    naive, report = pyobc.prune(model, scores, 0.5)
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, OBCAdapted)}
    expected = {r for r in report.removed if ADAPTED[name](r)}
    assert expected and {n for n in wrapped if adapted.get_submodule(n).post is not None} == expected
    adapters = pyobc.adapter_parameters(adapted)
    assert len(adapters) == len(expected) + sum(adapted.get_submodule(n).pre is not None for n in wrapped)
    # 1. at initialisation: exactly naive pruning
    adapted.eval()
    with torch.no_grad():
        want = naive.eval()(x)
        assert torch.allclose(adapted(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # 2. a few random training steps (adapters with their own learning rate)
    ids = {id(p) for p in adapters}
    opt = torch.optim.SGD([{"params": [p for p in adapted.parameters() if id(p) not in ids], "lr": 0.05},
                           {"params": adapters, "lr": 0.2}], momentum=0.9)
    start = [p.detach().clone() for p in adapters]
    adapted.train()
    for _ in range(3):
        loss = F.cross_entropy(adapted(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted.eval()
    assert any(not torch.equal(a, b) for a, b in zip(start, adapters))  # C and D did train
    # 3. fold: a plain network of the pruned width with the adapter model's outputs
    folded = pyobc.fold(adapted)
    assert not any(isinstance(m, OBCAdapted) for m in folded.modules())
    assert any(isinstance(m, OBCAdapted) for m in adapted.modules())  # fold returned a copy
    assert type(folded) is type(model)
    assert tensor_shapes(folded) == tensor_shapes(naive)
    assert_consistent(folded)
    with torch.no_grad():
        want = adapted(x)
        assert torch.allclose(folded(x), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    # the folded model saves and loads like any pruned model
    plan = pyobc.pruning.plan.plan_of(folded)
    assert sum(len(e["keep"]) for e in plan) == len(report.removed)
    pyobc.save(folded, tmp_path / "folded.pt")
    fresh = pyobc.models.get(name, in_channels=1, input_size=8, **ZOO[name]).eval()
    with torch.no_grad():
        assert torch.equal(pyobc.load(fresh, tmp_path / "folded.pt")(x), folded(x))


def test_fold_inplace_and_errors():
    model = build("vgg11")
    x, y = data(1)
    scores = pyobc.score(model, [(x, y)], "taylor")
    adapted = pyobc.equivalent_prune(model, scores, 0.5, scope="local")
    same = pyobc.fold(adapted, inplace=True)
    assert same is adapted and not pyobc.adapter_parameters(same)
    with pytest.raises(ValueError, match="no Equivalent Pruning adapters"):
        pyobc.fold(model)
    with pytest.raises(ValueError, match="different model"):
        pyobc.equivalent_prune(same, scores, 0.5)


def test_qualification_reasons():
    model = build("resnet20")
    groups = pyobc.score(model, None, "magnitude", example_inputs=inputs()).groups
    reasons = {g.root: qualifies(model, g) for g in groups}
    assert "residual" in reasons["conv1"]
    vit = build("vit_tiny")
    vgroups = pyobc.score(vit, None, "magnitude", example_inputs=inputs()).groups
    stream = next(g for g in vgroups if g.divisor > 1)
    assert "head" in qualifies(vit, stream)
    # a consumer reading channels from two producers (a concatenation) does not qualify
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))

    cat = Cat()
    cgroups = pyobc.score(cat, None, "magnitude", example_inputs=torch.randn(2, 4)).groups
    assert all("other layers" in qualifies(cat, g) for g in cgroups)


class _IntWidth(nn.Module):
    """Reshapes with a width written as an int: cutting fc1 breaks it in a way the tracer cannot see."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).reshape(-1, 8))


def test_a_broken_result_is_never_handed_back():
    from pyobc.errors import PrunedModelError

    net, x = _IntWidth(), torch.randn(2, 4)
    scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    for prune in (pyobc.prune, pyobc.equivalent_prune):
        with pytest.raises(PrunedModelError, match=r"inside 'fc2.*ignored_layers=\['fc1'\]"):
            prune(net, scores, 0.5, example_inputs=x)
    adapted = pyobc.equivalent_prune(net, scores, 0.5, example_inputs=x, ignored_layers=["fc1"])
    torch.testing.assert_close(adapted(x), net(x))
