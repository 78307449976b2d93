"""OBD's squared per-sample gradient sums formed in chunks of samples (``ops.reference.SQ_CHUNK_BYTES``).

The diagonal Fisher is compared with a Python loop of one-sample backward passes (plain autograd, float64),
with the chunk size forced down so that every conv/linear layer is split into several chunks, the last one
shorter, including a conv called twice per forward pass (its calls are added per sample before squaring).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyobc
from pyobc import ops
from pyobc.scoring import per_sample

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    """A strided conv, a conv applied twice (shared weights), BatchNorm, and a linear layer on tokens."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.bn1 = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.tok = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.shared(F.relu(self.shared(h))))
        t = self.tok(h.flatten(2).transpose(1, 2))  # (N, positions, 5): a 3-D linear input
        return self.head(t.mean(1))


def _fisher_by_loop(model, x, y):
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            fisher[n] += g ** 2
    return {n: f / x.shape[0] for n, f in fisher.items()}


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 8 * (4 * 4 * 9 + 4 + 2 * 4 * 4 * 4)])
def test_chunked_sq_grad_sums_match_per_sample_loop(monkeypatch, chunk_bytes):
    """Chunks of 1 sample, and of 3 (7 = 3 + 3 + 1) for the shared conv, 2 for conv1: chunk_bytes / what a
    sample touches (float64 weight gradient, 4x4x3x3 + 4, plus input and output, 4x4x4 each)."""
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(7, 3, 8, 8)
    y = torch.randint(0, 3, (7,))
    calls = []
    original = per_sample._conv_weight_grads
    monkeypatch.setattr(ops.reference, "SQ_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(per_sample, "_conv_weight_grads", lambda m, a, g: calls.append(a.shape[0]) or original(m, a, g))
    scores = pyobc.score(model, [(x, y)], "obd", granularity="weight")
    assert max(calls) < x.shape[0] and sum(calls) % x.shape[0] == 0, calls  # the batch really was split
    fisher = _fisher_by_loop(model, x, y)
    got = scores.by_parameter()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].double(), 0.5 * p.detach() ** 2 * fisher[n], rtol=1e-9, atol=1e-16,
                                   msg=n)
