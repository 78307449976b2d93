"""pyobc.prune: physical removal on every zoo model, exactness, limits, targets, reports and errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
from pyobc.grouping import Group, Member, Slice
from pyobc.masking import zero_channels
from pyobc.pruning.counting import macs_from, tensor_shapes, trace_costs
from prune_testing import ZOO, assert_consistent, build, inputs, state_equal

pytestmark = pytest.mark.usefixtures("one_thread")


def random_scores(model, x, seed=0):
    """magnitude scores with random values (any ranking must give a valid model)."""
    s = pyobc.score(model, None, "magnitude", example_inputs=x)
    g = torch.Generator().manual_seed(seed)
    s.values = [torch.rand(v.shape, generator=g) for v in s.values]
    return s


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_prune_and_run(name):
    model = build(name)
    before = copy.deepcopy(model)
    x = inputs()
    scores = random_scores(model, x)
    for scope in ("global", "local"):
        pruned, report = pyobc.prune(model, scores, 0.5, scope=scope, example_inputs=x)
        assert pruned is not model
        assert pruned(x).shape == (2, 10)
        assert_consistent(pruned)
        assert report.params_after == sum(p.numel() for p in pruned.parameters()) < report.params_before
        assert report.macs_after < report.macs_before
        # report widths are the real widths of the roots
        for row in report.layers:
            w = pruned.get_submodule(row.root).weight
            assert w.shape[0] == row.kept
        removed = report.channels_before - report.channels_after
        if scope == "global":
            assert removed >= 0.5 * report.channels_before
        else:
            for g, row in zip(scores.groups, report.layers):
                if g.divisor == 1:
                    assert row.total - row.kept == min(math.floor(0.5 * g.size + 0.5), g.size - 1)
    # inplace=False left the model exactly as it was
    assert state_equal(model, before)
    assert pyobc.pruning.plan.plan_of(model) == []


@pytest.mark.parametrize("name", sorted(ZOO))
def test_removing_zeroed_channels_leaves_outputs_unchanged(name):
    """Channels whose parameters are all zero have no effect; removing them must not change the outputs.
    (The ViT's residual stream is left out: its LayerNorms normalise over the remaining channels.)"""
    model = build(name)
    x = inputs(4)
    ignored = ["patch_embed"] if name == "vit_tiny" else []
    groups = pyobc.score(model, None, "magnitude", example_inputs=x, ignored_layers=ignored).groups
    g = torch.Generator().manual_seed(3)
    zero = {gr.root: torch.randperm(gr.size, generator=g)[:math.floor(0.3 * gr.size + 0.5)] for gr in groups}
    zeroed = zero_channels(model, groups, zero)
    scores = pyobc.score(zeroed, None, "magnitude", example_inputs=x, ignored_layers=ignored)
    pruned, report = pyobc.prune(zeroed, scores, 0.3, scope="local", ignored_layers=ignored)
    for root, channels in zero.items():
        assert torch.equal(report.removed.get(root, torch.zeros(0, dtype=torch.long)), torch.sort(channels).values)
    assert report.channels_after < report.channels_before
    with torch.no_grad():
        want, got = zeroed(x), pruned(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class Attention(nn.Module):
    """An embedding stream through multi-head attention without LayerNorm (so removal = zeroing)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("scope", ["global", "local"])
def test_attention_heads_stay_even_and_exact(scope):
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(3, 5, 6)
    scores = random_scores(model, x, seed=1)
    stream = [g for g in scores.groups if g.divisor == 4]
    assert len(stream) == 1
    scores.values[scores.groups.index(stream[0])] *= 0.01  # make sure the attention stream is cut globally
    pruned, report = pyobc.prune(model, scores, 0.5, scope=scope, example_inputs=x)
    assert_consistent(pruned)
    removed = report.removed[stream[0].root]
    assert pruned.attn.embed_dim == 16 - removed.numel() and pruned.attn.embed_dim % 4 == 0
    assert torch.bincount(removed // 4, minlength=4).unique().numel() == 1  # the same count from every head
    want = zero_channels(model, scores.groups, report.removed)(x)
    assert torch.allclose(pruned(x), want, atol=1e-5)


def test_vit_residual_stream_and_attention_consistent():
    model = build("vit_tiny")
    x = inputs()
    scores = random_scores(model, x)
    stream = next(g for g in scores.groups if g.root.endswith("fc2") or g.divisor > 1)
    pruned, report = pyobc.prune(model, scores, 0.5, scope="local", example_inputs=x, round_to=3)
    kept = 16 - report.removed[stream.root].numel()
    assert kept % 2 == 0 and kept % 3 == 0  # heads and round_to
    assert pruned.cls_token.shape[-1] == pruned.pos_embed.shape[-1] == pruned.patch_embed.out_channels == kept
    for block in pruned.blocks:
        assert block.attn.embed_dim == block.norm1.weight.shape[0] == block.fc2.out_features == kept
    assert pruned.head.in_features == kept and pruned(x).shape == (2, 10)
    assert_consistent(pruned)


def test_round_to_and_max_layer_ratio():
    model = build("resnet20")
    x = inputs()
    scores = random_scores(model, x)
    pruned, report = pyobc.prune(model, scores, 0.6, scope="local", round_to=3)
    for row in report.layers:
        assert row.kept % 3 == 0 or row.kept == row.total
    # one group with very low scores: the global ranking would empty it, max_layer_ratio caps it
    low = scores.groups[3]
    scores.values[3] = scores.values[3] * 1e-6
    for cap in (0.5, 1.0):
        _, report = pyobc.prune(model, scores, 0.3, max_layer_ratio=cap)
        row = report.layers[3]
        assert row.total - row.kept == (math.floor(cap * low.size) if cap < 1 else low.size - 1)


@pytest.mark.parametrize("target", ["params", "macs"])
def test_params_and_macs_targets_are_reached(target):
    model = build("resnet20")
    x = inputs()
    scores = random_scores(model, x)
    costs = trace_costs(model, x)
    for scope in ("global", "local"):
        pruned, report = pyobc.prune(model, scores, 0.4, scope=scope, target=target, example_inputs=x)
        before, after = ((report.params_before, report.params_after) if target == "params"
                         else (report.macs_before, report.macs_after))
        assert 0.4 <= (before - after) / before < 0.55
        assert report.macs_after == macs_from(costs, tensor_shapes(pruned))  # prediction = measurement
    with pytest.raises(ValueError, match="example_inputs"):
        pyobc.prune(model, scores, 0.4, target="macs")


def test_counts_agree_with_torch_pruning_on_conv_linear_nets():
    import torch_pruning as tp

    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(8, 6, 3, padding=1, bias=False),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5, bias=False))
    x = torch.randn(1, 3, 6, 6)
    macs, params = tp.utils.count_ops_and_params(net, x)
    assert pyobc.count(net, x) == (params, macs)
    assert pyobc.count(net) == (params, None)


def test_report_table():
    model = build("mlp")
    x = inputs()
    _, report = pyobc.prune(model, random_scores(model, x), 0.5, example_inputs=x)
    text = str(report)
    assert "| params |" in text and "| MACs/sample |" in text and "| layers.0 |" in text
    assert "kept" in text and "forward hooks" in text


def test_inplace_prunes_the_model_itself():
    model = build("vgg11")
    x = inputs()
    pruned, _ = pyobc.prune(model, random_scores(model, x), 0.5, inplace=True)
    assert pruned is model and model.features[0].out_channels < 8


def test_errors():
    model = build("resnet20")
    x = inputs()
    scores = random_scores(model, x)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            pyobc.prune(model, scores, bad)
    with pytest.raises(ValueError, match="scope"):
        pyobc.prune(model, scores, 0.5, scope="everywhere")
    with pytest.raises(ValueError, match="max_layer_ratio"):
        pyobc.prune(model, scores, 0.5, max_layer_ratio=0)
    with pytest.raises(ValueError, match="ignored_layers"):
        pyobc.prune(model, scores, 0.5, ignored_layers=["no.such.layer"])
    # scores of another model, and of this model before it was pruned
    other = pyobc.models.resnet20(in_channels=1, input_size=8, width=0.5)
    with pytest.raises(ValueError, match="different model"):
        pyobc.prune(other, scores, 0.5)
    pruned, _ = pyobc.prune(model, scores, 0.5)
    with pytest.raises(ValueError, match="different shapes"):
        pyobc.prune(pruned, scores, 0.5)
    # a group whose root is not in the model
    ghost = Group("ghost", 4, (Member("ghost", "out", "Linear", torch.arange(4), torch.arange(4),
                                      (Slice("ghost.weight", 0, torch.arange(4), torch.arange(4)),)),))
    fake = pyobc.Scores("magnitude", [ghost], [torch.rand(4)])
    with pytest.raises(ValueError, match="ghost"):
        pyobc.prune(model, fake, 0.5)
    # a layer that cannot be cut: a transposed convolution
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    s = pyobc.score(net, None, "magnitude", example_inputs=torch.randn(2, 3, 6, 6))
    with pytest.raises(NotImplementedError, match="transposed convolutions"):
        pyobc.prune(net, s, 0.5, scope="local")
    small, report = pyobc.prune(net, s, 0.5, scope="local", ignored_layers=["0", "2"])
    assert report.channels_after == report.channels_before
    with pytest.raises(TypeError, match="pyobc.Scores"):
        pyobc.prune(model, {"conv1": torch.rand(4)}, 0.5)


# -- structured elimination-compensation ---------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_mlp():
    torch.manual_seed(0)
    loader = pyobc.datasets.digits("train", batch_size=128, image_size=8)
    model = pyobc.models.mlp(in_channels=1, input_size=8, hidden=(32, 16))
    pyobc.models.train(model, loader, 4, 0.1, weight_decay=5e-4, progress=False)
    data = [b for _, b in zip(range(3), loader)]
    return model.eval(), data


def mean_loss(model, data):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


def test_structured_compensation_lowers_the_loss(digits_mlp):
    model, data = digits_mlp
    scores = pyobc.score(model, data, "ec")
    for ratio in (0.25, 0.5):
        comp, report = pyobc.prune(model, scores, ratio, compensate=True)
        plain, _ = pyobc.prune(model, scores, ratio)
        assert report.compensated
        assert mean_loss(comp, data) < mean_loss(plain, data)
        assert state_equal(comp.layers[0], plain.layers[0])  # only consumer biases differ
    with pytest.raises(ValueError, match="ec_channel_shift"):
        pyobc.prune(model, pyobc.score(model, data, "jacobian"), 0.5, compensate=True)
