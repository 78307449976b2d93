"""The oracle against direct masked evaluations with plain PyTorch (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
from pyobc.masking import zero_channels

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


class ResCNN(nn.Module):
    """stem+bn -> relu -> [c1+bn1 -> relu -> c2+bn2] + stem output -> relu -> c3 -> relu -> pool -> fc.

    Groups: the residual stream (stem, bn, c2, bn2, consumers c1 and c3; rooted at c2), c1 (bn1,
    consumer c2), c3 (consumer fc)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.bn1 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c2, self.bn2 = nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            for bn in (self.bn, self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))))
        h = F.relu(self.c3(h))
        return self.fc(h.mean((2, 3)))


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = ResCNN()
    x = torch.randn(12, 3, 5, 5)
    y = torch.randint(0, 3, (12,))
    loader = [(x[:7], y[:7]), (x[7:], y[7:])]  # unequal batches: the mean runs over samples
    return model, x, y, loader


def test_oracle_equals_masked_evaluation_and_leaves_model_alone(setup):
    model, x, y, loader = setup
    model.train()  # scoring must evaluate in eval mode and give the flags back
    F.cross_entropy(model(x), y).backward()  # existing .grad must survive
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    s = pyobc.score(model, loader, "oracle")

    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n

    residual = next(g for g in s.groups if any(m.module == "stem" for m in g.members))
    assert {m.module for m in residual.members} >= {"stem", "bn", "c2", "bn2", "c1", "c3"}
    assert len(s.groups) == 3
    reference = model.eval()
    with torch.no_grad():
        base = F.cross_entropy(reference(x), y)
        for g in s.groups:
            expected = torch.zeros(g.size)
            for c in range(g.size):
                zeroed = zero_channels(reference, s.groups, {g.root: [c]}).eval()
                expected[c] = F.cross_entropy(zeroed(x), y) - base
            torch.testing.assert_close(s.by_module()[g.root], expected, rtol=1e-10, atol=1e-13)
    model.train()
    assert torch.equal(model.stem.weight, state["stem.weight"])
    assert s.batches == 2 and s.samples == 12
    # removing a residual channel really matters here: the scores are not trivially zero
    assert s.by_module()[residual.root].abs().min() > 0


def test_oracle_progress_bar_and_option_check(setup, capsys):
    model, _, _, loader = setup
    s1 = pyobc.score(model, loader, "oracle", progress=True)
    s0 = pyobc.score(model, loader, "oracle", progress=False)
    for k, v in s0.by_module().items():
        torch.testing.assert_close(s1.by_module()[k], v)
    assert "pyobc oracle" in capsys.readouterr().err  # the per-structure bar
    with pytest.raises(TypeError, match="unexpected option"):
        pyobc.score(model, loader, "oracle", structure_progress=True)
    assert "oracle" in pyobc.methods()


def test_oracle_custom_loss(setup):
    """A user loss (here a label-smoothed cross-entropy on dict batches) is what the oracle measures."""
    model, x, y, _ = setup

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch["x"]), batch["y"], label_smoothing=0.1)

    s = pyobc.score(model, [{"x": x, "y": y}], "oracle", loss_fn=loss_fn)
    g = s.group("c1")[0]
    with torch.no_grad():
        base = loss_fn(model.eval(), {"x": x, "y": y})
        for c in range(g.size):
            zeroed = zero_channels(model, s.groups, {"c1": [c]}).eval()
            torch.testing.assert_close(s.by_module()["c1"][c], loss_fn(zeroed, {"x": x, "y": y}) - base,
                                       rtol=1e-10, atol=1e-13)
