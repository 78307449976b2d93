"""OBD's squared per-sample gradient sums from pairs of output positions (``pyobc.scoring.position_pairs``).

Layers with few output positions per sample get ``sum_n G_n**2`` from one matrix product over pairs of
positions instead of forming per-sample gradients. Compared here with a Python loop of one-sample backward
passes (plain autograd, float64) on layers that take that path — 1x1 and 2x2 conv outputs (stride,
dilation, asymmetric padding), a conv called twice, a 1-D conv, linear layers on 2-D inputs called twice
and on three tokens — and on the same network with the path switched off, so that both paths are checked
against the loop and shown to be taken.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyobc
from pyobc.scoring import per_sample, position_pairs

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=(1, 0))           # 5x5 -> 3x2: 6 positions
        self.dilated = nn.Conv2d(4, 5, 2, dilation=(1, 2), padding=(0, 1))  # 3x2 -> 2x2: 4 positions
        self.shared = nn.Conv2d(5, 5, 3, padding=1, bias=False)             # 2x2, called twice: 8 positions
        self.line = nn.Conv1d(5, 6, 3, padding=1)                           # 3 tokens
        self.tok = nn.Linear(6, 6)                                          # 3 tokens
        self.twice = nn.Linear(6, 6)                                        # 2-D input, called twice
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.dilated(h))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        t = torch.tanh(self.line(h.flatten(2)[:, :, :3]))                  # (N, 6, 3)
        t = torch.tanh(self.tok(t.transpose(1, 2))).mean(1)                # (N, 6)
        return self.head(torch.tanh(self.twice(torch.tanh(self.twice(t)))))


def _fisher_by_loop(model, x, y):
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            fisher[n] += g ** 2
    return {n: f / x.shape[0] for n, f in fisher.items()}


@pytest.mark.parametrize("pairs", [True, False])
def test_pair_and_per_sample_paths_match_a_per_sample_loop(monkeypatch, pairs):
    torch.manual_seed(0)
    model = Net().eval()
    x, y = torch.randn(7, 3, 5, 5), torch.randint(0, 3, (7,))
    # one sample's gradient never fills a chunk here, so PAIR_POSITIONS (4) decides; 8 lets the shared
    # conv's two calls (4 positions each) in as well, 0 switches the path off
    monkeypatch.setattr(per_sample, "PAIR_POSITIONS", 8 if pairs else 0)
    shapes = []
    original = position_pairs.pair_sq_sums
    monkeypatch.setattr(position_pairs, "pair_sq_sums",
                        lambda parts: shapes.append(sum(p.shape[1] for p, _ in parts)) or original(parts))
    got = pyobc.score(model, [(x, y)], "obd", granularity="weight").by_parameter()
    # positions per layer that took the path: stem 6, dilated 4, shared 8, line 3, tok 3, twice 2, head 1
    assert sorted(shapes) == ([1, 2, 3, 3, 4, 6, 8] if pairs else [])
    fisher = _fisher_by_loop(model, x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].double(), 0.5 * p.detach() ** 2 * fisher[n], rtol=1e-9, atol=1e-16,
                                   msg=n)


def test_path_choice_follows_positions_and_sample_size():
    """At most PAIR_POSITIONS positions always; up to PAIR_POSITIONS_WHEN_ONE_SAMPLE only for layers whose
    one-sample gradient fills a chunk (measured: pairs lose with few channels at 9 positions)."""
    from pyobc.scoring.capture import Record

    def chosen(conv, size):
        x = torch.randn(2, conv.in_channels, size, size)
        y = conv(x)
        calls = [(Record((x,), {}, y, ()), [torch.randn_like(y)])]
        return per_sample._pair_sums(conv, calls, None) is not None

    small, large = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(256, 256, 3, padding=1)  # 2.4 KB / 2.4 MB per sample
    assert chosen(small, 2) and chosen(large, 2)          # 4 positions
    assert not chosen(small, 3) and chosen(large, 3)      # 9 positions
    assert not chosen(large, 4)                           # 16 positions
    assert not per_sample._pair_sums(nn.Conv2d(8, 8, 3, padding=1, groups=2), [
        (Record((torch.randn(2, 8, 2, 2),), {}, torch.randn(2, 8, 2, 2), ()), [torch.randn(2, 8, 2, 2)])], None)
