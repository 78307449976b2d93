"""Grouped (non-depthwise) convolutions lose the same number of channels from each of their groups.

The pruned network is compared with the unpruned one whose removed channels are switched off by hand
(their BatchNorm scale and shift set to 0, so ReLU passes 0 on): in eval mode the two compute the same.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pyobc


class GroupedNet(nn.Module):
    """conv a (3->8) + bn -> relu -> grouped conv b (8->12, groups=4) + bn -> relu -> conv c (12->5) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 5, 1)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for bn in (self.bn_a, self.bn_b):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.6)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(self.c(x).mean((2, 3)))


def _switched_off(net: GroupedNet, removed: dict[str, list[int]]) -> GroupedNet:
    ref = GroupedNet()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        for layer, bn in (("a", ref.bn_a), ("b", ref.bn_b)):
            bn.weight[removed[layer]] = 0
            bn.bias[removed[layer]] = 0
    return ref.eval()


@pytest.mark.parametrize("ratio", [0.34, 0.5, 0.75])
def test_grouped_conv_loses_equal_channels_per_group(ratio):
    torch.manual_seed(0)
    net, x = GroupedNet().eval(), torch.randn(4, 3, 6, 6)
    scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    by_root = {g.root: (g, v) for g, v in zip(scores.groups, scores.values)}
    assert by_root["a"][0].divisor == 4 and by_root["b"][0].divisor == 4
    small, _ = pyobc.prune(net, scores, ratio, scope="local", example_inputs=x, ignored_layers=["c"])
    assert small.b.groups == 4 and small.b.in_channels % 4 == 0 and small.b.out_channels % 4 == 0
    assert small.b.weight.shape == (small.b.out_channels, small.b.in_channels // 4, 3, 3)
    removed = {}
    for root, width in (("a", 8), ("b", 12)):
        _, v = by_root[root]
        per = round(ratio * width) // 4
        blocks = v.reshape(4, width // 4)  # the lowest-scored `per` channels of each group go
        removed[root] = sorted((torch.argsort(blocks, dim=1, stable=True)[:, :per]
                                + torch.arange(4)[:, None] * (width // 4)).reshape(-1).tolist())
        assert len(removed[root]) == 4 * per
    assert small.a.out_channels == 8 - len(removed["a"]) and small.c.in_channels == 12 - len(removed["b"])
    torch.testing.assert_close(small(x), _switched_off(net, removed)(x))


def test_grouped_conv_scores_and_prunes_with_data():
    torch.manual_seed(1)
    net, x, y = GroupedNet().eval(), torch.randn(6, 3, 6, 6), torch.randint(0, 3, (6,))
    scores = pyobc.score(net, [(x, y)], "oba")
    small, _ = pyobc.prune(net, scores, 0.3, target="params")
    assert small(x).shape == (6, 3)
    assert small.b.in_channels % 4 == 0 and small.b.out_channels % 4 == 0


def test_a_lopsided_cut_is_refused_before_anything_is_cut():
    from pyobc.pruning.slicing import apply_remove

    net, x = GroupedNet().eval(), torch.randn(2, 3, 6, 6)
    groups = pyobc.score(net, None, "magnitude", example_inputs=x).groups
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"same number of channels from each of its 4 heads / groups, got \[2, 0, 0, 0\]"):
        apply_remove(net, groups, {"b": torch.tensor([0, 1])})  # both from the first of b's 4 groups
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    apply_remove(net, groups, {"b": torch.tensor([0, 3, 6, 9])})  # one from each group
    assert net.b.out_channels == 8 and net(x).shape == (2, 3)
