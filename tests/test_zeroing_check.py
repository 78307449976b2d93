"""pyobc.prune compares the pruned model with the unpruned one with the same channels zeroed.

A channel shuffle between two convs is grouped by Torch-Pruning as if channels stayed in place, so the cut
removes the wrong input channels of the consumer: the pruned model runs and computes something else. The
reference here is independent of the check: the unpruned model with the channels zeroed by
:func:`pyobc.masking.zero_channels` (a deep copy, parameters multiplied by the masks), run as a plain module.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import pyobc
from pyobc.masking import zero_channels
from pyobc.pruning.zeroing_check import check_zeroing_equivalence, mismatched_groups, zeroed_outputs


class Shuffled(nn.Module):
    """conv -> channel shuffle (view, transpose, reshape) -> conv: channel i of ``a`` reaches ``b`` elsewhere."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.b(x).mean((2, 3)))


class Residual(nn.Module):
    """conv-BN-ReLU twice with a residual add, BN running statistics away from 0/1 (zeroing != removal
    unless the BN channels are zeroed too)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_()
                bn.bias.normal_()

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn1(self.conv(x)))
        return self.head(x.mean((2, 3)))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])


def _prune(model, ratio, **kw):
    x, y = _batch()
    scores = pyobc.score(model, [(x, y)], "ec" if kw.get("compensate") else "taylor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, report = pyobc.prune(model, scores, ratio, example_inputs=x, **kw)
    flagged = [w for w in caught if "zeroed" in str(w.message)]
    return scores, small, report, flagged


def test_channel_shuffle_cut_is_flagged():
    torch.manual_seed(0)
    model = Shuffled().eval()
    scores, small, report, flagged = _prune(model, 0.25, ignored_layers=["b"])  # an even cut of a only
    assert len(flagged) == 1 and "channel shuffle" in str(flagged[0].message)
    assert "ignored_layers=['a']" in str(flagged[0].message)  # the group whose cut alone is wrong
    assert flagged[0].filename == __file__  # points at the caller of pyobc.prune
    # independently: the cut really computes something else than the model with those channels zeroed
    zeroed = zero_channels(model, scores.groups, report.removed)
    x, _ = _batch()
    with torch.no_grad():
        a, b = zeroed(x), small.eval()(x)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


def test_following_the_suggestion_silences_the_check():
    """Cutting only the groups the warning does not name (b's channels, then the head's inputs) is right."""
    torch.manual_seed(0)
    model = Shuffled().eval()
    _, small, report, flagged = _prune(model, 0.25, ignored_layers=["a"])
    assert not flagged and report.removed and "a" not in report.removed


def test_an_in_place_cut_is_checked_without_naming_groups():
    torch.manual_seed(0)
    _, _, _, flagged = _prune(Shuffled().eval(), 0.25, ignored_layers=["b"], inplace=True)
    assert len(flagged) == 1 and "ignored_layers=[" not in str(flagged[0].message)  # the unpruned model is gone
    assert "pass the layers around such an op in ignored_layers" in str(flagged[0].message)


@pytest.mark.parametrize("kw", [{}, {"inplace": True}, {"compensate": True}], ids=["copy", "inplace", "compensate"])
def test_correct_cut_is_silent_and_matches_zeroing(kw):
    torch.manual_seed(0)
    model = Residual().eval()
    reference = Residual().eval()
    reference.load_state_dict(model.state_dict())
    scores, small, report, flagged = _prune(model, 0.4, **kw)
    assert not flagged
    assert report.removed  # something was cut
    if not kw:  # independent: zeroing with pyobc.masking on the untouched model gives the pruned outputs
        x, _ = _batch()
        zeroed = zero_channels(reference, scores.groups, report.removed)
        with torch.no_grad():
            a, b = zeroed(x), small.eval()(x)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_reference_is_taken_from_zeroed_parameters():
    """zeroed_outputs zeroes exactly the removed slices (independent: zero_channels on a copy) and leaves
    the model's own parameters as they were."""
    torch.manual_seed(0)
    model = Residual().eval()
    x, y = _batch()
    groups = pyobc.score(model, [(x, y)], "magnitude").groups
    remove = {groups[0].root: torch.tensor([0, 3])}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = zeroed_outputs(model, groups, remove, x)
    with torch.no_grad():
        expected = zero_channels(model, groups, remove)(x)
    torch.testing.assert_close(want[0], expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert check_zeroing_equivalence(want, zero_channels(model, groups, remove), x) == 0.0


def test_check_does_not_apply_across_channel_norms():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    groups = pyobc.score(net, [(x, torch.tensor([0, 1]))], "magnitude").groups
    assert zeroed_outputs(net, groups, {groups[0].root: torch.tensor([1])}, x) is None
    assert zeroed_outputs(net, groups, {groups[0].root: torch.tensor([], dtype=torch.long)}, x) is None


def test_group_search_reports_whether_it_tried_every_group():
    torch.manual_seed(0)
    model = Shuffled().eval()
    x, y = _batch()
    groups = pyobc.score(model, [(x, y)], "magnitude").groups
    remove = {"a": torch.tensor([0, 5]), "b": torch.tensor([1, 2])}
    assert mismatched_groups(model, groups, remove, x) == (["a"], True)
    assert mismatched_groups(model, groups, remove, x, seconds=-1.0) == ([], False)
