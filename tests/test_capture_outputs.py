"""Records that keep no outputs (``Capture(on_output=...)``), as OBD's streamed pass uses them.

The streamed pass hooks each recorded output's gradient when the output is recorded, and the record keeps
meta-device stand-ins instead of the outputs, so that an output nothing else saves (a norm layer's, before
a ReLU) is freed as in a plain forward. Checked here: what the records hold, that an in-place op on an
output then needs no protective copy while one on a recorded input still does, and OBD's scores on a
block with ``ReLU(inplace=True)`` after batch norm and ``out += identity`` against a loop of one-sample
backward passes (float64).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyobc
from pyobc.scoring import capture as capture_module
from pyobc.scoring.capture import Capture, ModifiedInPlace


def test_records_hold_stand_ins_and_outputs_go_to_the_callback():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    seen = []
    with Capture({"0": net[0], "2": net[2]}, on_output=lambda name, k, y: seen.append((name, k, y))) as cap:
        out = net(torch.randn(5, 3, requires_grad=True))
    assert [(n, k) for n, k, _ in seen] == [("0", 0), ("2", 0)]
    assert seen[1][2] is out and seen[0][2].shape == (5, 4)
    for name in ("0", "2"):
        (rec,) = cap.records[name]
        assert rec.y.device.type == "meta" and rec.y.shape == seen[int(name) // 2][2].shape
        assert rec.x.device.type == "cpu"
    # the ReLU wrote to layer 0's output in place: not a modified record any more
    cap.check_intact()
    assert cap.outputs() == []  # stand-ins need no grad: nothing for a later autograd.grad call


def test_in_place_change_of_a_recorded_input_is_still_caught():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))

    def forward(x):
        h = net[0](x)
        y = net[1](h)
        h.mul_(2)  # the input recorded for layer 1
        return y

    with Capture({"1": net[1]}, on_output=lambda *a: None) as cap:
        forward(torch.randn(2, 3, requires_grad=True))
    with pytest.raises(ModifiedInPlace):
        cap.check_intact()


class Block(nn.Module):
    """torchvision's basic block: conv -> BN -> ReLU(inplace) -> conv -> BN, ``out += identity``, ReLU(inplace)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        for bn in (self.bn1, self.bn2):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.usefixtures("float64")
def test_obd_on_in_place_block_matches_a_per_sample_loop(monkeypatch):
    torch.manual_seed(0)
    model = Net().eval()
    x, y = torch.randn(6, 3, 6, 6), torch.randint(0, 3, (6,))
    protected = []

    class Watched(Capture):
        def __init__(self, modules, protect=(), on_output=None):
            protected.extend(protect)
            super().__init__(modules, protect, on_output)

    monkeypatch.setattr("pyobc.scoring.context.Capture", Watched)
    got = pyobc.score(model, [(x, y)], "obd", granularity="weight").by_parameter()
    assert protected == []  # BN outputs written by ReLU(inplace=True) / += needed no copies
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            fisher[n] += g ** 2 / x.shape[0]
    assert any(float(f.abs().max()) > 0 for f in fisher.values())
    for n, p in params.items():
        torch.testing.assert_close(got[n].double(), 0.5 * p.detach() ** 2 * fisher[n], rtol=1e-9, atol=1e-16,
                                   msg=n)


def test_stand_in_keeps_structure():
    out = (torch.ones(2, 3), [torch.zeros(4)], 7)
    s = capture_module._stand_in(out)
    assert isinstance(s, tuple) and isinstance(s[1], list) and s[2] == 7
    assert s[0].device.type == "meta" and s[0].shape == (2, 3) and s[1][0].shape == (4,)
