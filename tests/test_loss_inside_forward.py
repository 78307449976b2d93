"""Models that compute their loss inside ``forward`` (the Hugging Face ``labels=`` idiom) return the loss
next to the logits. Criteria that linearise the loss or take its curvature at the model's outputs must
use the logits, not the returned scalar: every criterion gives the same scores whichever way the loss is
computed (float64, a tiny MLP)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh())
        self.head = nn.Linear(7, 4)

    def forward(self, x, labels=None):
        logits = self.head(self.body(x))
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def outside(model, batch):
    x, y = batch
    return F.cross_entropy(model(x)["logits"], y)


def inside(model, batch):
    x, y = batch
    return model(x, labels=y)["loss"]


@pytest.mark.parametrize("method,options", [
    ("taylor", {}), ("obd", {}), ("jacobian", {}), ("oba", {}), ("oba", {"hessian": "full"}),
    ("sosp-h", {}), ("sosp-i", {}), ("ec", {}),
])
def test_scores_do_not_depend_on_where_the_loss_is_computed(method, options):
    torch.manual_seed(0)
    model = Net().double()
    data = [(torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 4, (5,))) for _ in range(2)]
    want = pyobc.score(model, data, method, loss_fn=outside, **options)
    got = pyobc.score(model, data, method, loss_fn=inside, **options)
    got, want = got.by_module(), want.by_module()
    assert sorted(got) == sorted(want) == ["body.0", "body.2"]  # the head is never a group
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)
