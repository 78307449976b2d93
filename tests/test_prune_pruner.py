"""pyobc.Pruner: iterative pruning to a schedule of the original size, with fine-tuning callbacks."""
from __future__ import annotations

import pytest
import torch

import pyobc
from pyobc.pruning.plan import plan_of
from prune_testing import assert_consistent, build

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pruner_follows_the_schedule_of_the_original_size():
    model = build("resnet20")
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    calls = []
    pruner = pyobc.Pruner(model, loader, "taylor", steps=3, ratio=0.5,
                          finetune=lambda m, step: calls.append((step, sum(p.numel() for p in m.parameters()))))
    assert [round(pruner.ratio_at(t), 4) for t in range(4)] == [0, 0.1667, 0.3333, 0.5]
    final, reports = pruner.run()
    original = reports[0].channels_before
    for t, r in enumerate(reports, 1):
        removed = 1 - r.channels_after / original
        assert pruner.ratio_at(t) <= removed < pruner.ratio_at(t) + 0.05
        assert r.channels_before == (original if t == 1 else reports[t - 2].channels_after)
    assert [c[0] for c in calls] == [1, 2, 3] and calls[-1][1] == reports[-1].params_after
    assert final(loader[0][0]).shape == (8, 10)
    assert_consistent(final)
    assert len(plan_of(final)) == 3
    assert plan_of(model) == []  # the model given was copied
    with pytest.raises(RuntimeError, match="steps are done"):
        pruner.step()


def test_pruner_geometric_params_target_and_layer_cap():
    model = build("vgg11")
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))]
    pruner = pyobc.Pruner(model, loader, "magnitude", steps=2, ratio=0.75, schedule="geometric", target="params",
                          max_layer_ratio=0.6)
    assert abs(pruner.ratio_at(1) - 0.5) < 1e-12
    final, reports = pruner.run()
    p0 = reports[0].params_before
    assert 0.5 <= 1 - reports[0].params_after / p0 < 0.6
    assert 1 - reports[1].params_after / p0 >= 0.6  # the cap may stop it before 75%
    for r0, r1 in zip(reports[0].layers, reports[1].layers):  # at most 60% of each ORIGINAL group removed
        assert r1.kept >= r0.total * 0.4 - 1e-9 or r1.kept == 1
    with pytest.raises(ValueError, match="steps"):
        pyobc.Pruner(model, loader, steps=0, ratio=0.5)
    with pytest.raises(ValueError, match="schedule"):
        pyobc.Pruner(model, loader, steps=2, ratio=0.5, schedule="cubic")
