"""Grouping and slicing on the structures of real models, rebuilt small (issue #12, part A).

Each test builds a tiny stand-in for a structure that broke on a real model (Hugging Face's ``labels=``
loss, tied embeddings, ``Conv1D``, attention that keeps its head layout in ints, grouped convolutions,
Torch-Pruning's group search) and checks pyobc against an independent computation: scores against sums
of squares written out by hand, pruned models against the same arithmetic done on index-selected
weights, groups against Torch-Pruning's own ``get_all_groups``. The last tests run the real classes
(timm, transformers) on tiny configurations.
"""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
from pyobc.grouping import build_groups
from pyobc.grouping_search import GroupSearchTimeout, search_groups

torch.manual_seed(0)


# -- 2. the output layer when the loss is computed inside forward -----------------------------------------

class LossInside(nn.Module):
    """Returns a dict with the loss (from ``labels``) and the logits, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x, labels=None):
        logits = self.head(torch.relu(self.fc(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def test_logits_stay_whole_when_the_model_computes_its_loss():
    net = LossInside()
    data = [{"x": torch.randn(8, 6), "labels": torch.randint(0, 5, (8,))}]
    scores = pyobc.score(net, data, "taylor", loss_fn=lambda m, b: m(b["x"], labels=b["labels"])["loss"])
    assert [g.root for g in scores.groups] == ["fc"]
    assert [(m.module, m.kind) for m in scores.groups[0].members] == [("fc", "out"), ("head", "in")]
    small, _ = pyobc.prune(net, scores, 0.5, scope="local")
    assert small.head.out_features == 5 and small.fc.out_features == 6


def test_ec_with_the_loss_inside_forward_equals_ec_with_the_loss_outside():
    net = LossInside()
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    inside = pyobc.score(net, [{"x": x, "labels": y}], "ec",
                         loss_fn=lambda m, b: m(b["x"], labels=b["labels"])["loss"])
    outside = pyobc.score(net, [{"x": x, "labels": y}], "ec",
                          loss_fn=lambda m, b: F.cross_entropy(m(b["x"])["logits"], b["labels"]))
    assert float(outside.values[0].abs().sum()) > 0
    torch.testing.assert_close(inside.values[0], outside.values[0])


class TwoOutputs(nn.Module):
    """Returns features that a head also reads: the features' producer is an output too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        feats = self.body(torch.relu(self.stem(x)))
        return self.head(torch.relu(feats)), feats


def test_every_returned_tensor_is_an_output():
    groups = build_groups(TwoOutputs(), torch.randn(2, 4))
    assert [g.root for g in groups] == ["stem"]


# -- 3. tied weights and Hugging Face's Conv1D -----------------------------------------------------------

class TiedLM(nn.Module):
    """Embedding, one residual MLP block, and an output layer tied to the embedding."""

    def __init__(self, vocab=11, width=6, hidden=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


def _tied_reference(net, ids, keep_width):
    """The model's logits computed by hand with the residual channels ``keep_width`` only."""
    e = net.embed.weight[:, keep_width]
    h = e[ids]
    a = torch.relu(h @ net.fc1.weight[:, keep_width].T + net.fc1.bias)
    h = h + a @ net.fc2.weight[keep_width].T + net.fc2.bias[keep_width]
    return h @ e.T


def test_tied_weights_are_one_tensor_in_scores_and_after_pruning():
    net = TiedLM()
    ids = torch.randint(0, 11, (2, 5))
    scores = pyobc.score(net, None, "magnitude", example_inputs=ids)
    group = next(g for g in scores.groups if g.size == 6)
    params = [s.param for m in group.members for s in m.slices]
    assert "head.weight" not in params and params.count("embed.weight") == 1
    with torch.no_grad():  # every weight removed with residual channel c, the tied matrix counted once
        want = (net.embed.weight.double().square().sum(0) + net.fc1.weight.double().square().sum(0)
                + net.fc2.weight.double().square().sum(1) + net.fc2.bias.double().square())
    got = scores.values[scores.groups.index(group)]
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-8)

    small, report = pyobc.prune(net, scores, 0.34, scope="local", example_inputs=ids, ignored_layers=["fc1"])
    assert small.head.weight is small.embed.weight and small.fc1.out_features == 10
    keep = torch.sort(torch.topk(want, small.embed.embedding_dim).indices).values
    with torch.no_grad():
        torch.testing.assert_close(small(ids), _tied_reference(net, ids, keep))
    assert report.params_after == sum(p.numel() for p in small.parameters())


class Conv1D(nn.Module):
    """The layout of ``transformers.pytorch_utils.Conv1D``: weight ``(in, out)``, ``y = x W + b``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.size()[:-1] + (self.nf,))


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(12, 5)
        self.c_proj = Conv1D(7, 12)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c_proj(torch.tanh(self.c_fc(x)))))


def test_conv1d_is_grouped_scored_counted_and_cut():
    net = Conv1DNet()
    x = torch.randn(4, 3, 5)
    scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    by_root = {g.root: (g, v) for g, v in zip(scores.groups, scores.values)}
    assert set(by_root) == {"c_fc", "c_proj"}
    g, v = by_root["c_fc"]
    with torch.no_grad():
        w1, b1, w2 = net.c_fc.weight.double(), net.c_fc.bias.double(), net.c_proj.weight.double()
        want = w1.square().sum(0) + b1.square() + w2.square().sum(1)
    torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-9)
    assert pyobc.count(net, x)[1] == 3 * (5 * 12 + 12 * 7 + 7 * 3)

    small, report = pyobc.prune(net, scores, 0.25, scope="local", example_inputs=x)
    keep = torch.sort(torch.topk(want, 9).indices).values
    keep2 = torch.sort(torch.topk(by_root["c_proj"][1], small.c_proj.nf).indices).values
    with torch.no_grad():
        h = torch.tanh(x @ net.c_fc.weight[:, keep] + net.c_fc.bias[keep])
        h = torch.tanh(h @ net.c_proj.weight[keep][:, keep2] + net.c_proj.bias[keep2])
        torch.testing.assert_close(small(x), h @ net.head.weight[:, keep2].T + net.head.bias)
    assert (small.c_fc.nf, small.c_proj.nx, small.c_proj.nf) == (9, 9, keep2.numel())
    assert report.macs_after == 3 * (5 * 9 + 9 * keep2.numel() + keep2.numel() * 3)


class LinearNet(nn.Module):
    """:class:`Conv1DNet` with ``nn.Linear`` layers holding the transposed weights."""

    def __init__(self, other):
        super().__init__()
        self.c_fc, self.c_proj, self.head = nn.Linear(5, 12), nn.Linear(12, 7), nn.Linear(7, 3)
        with torch.no_grad():
            for mine, theirs in ((self.c_fc, other.c_fc), (self.c_proj, other.c_proj)):
                mine.weight.copy_(theirs.weight.t())
                mine.bias.copy_(theirs.bias)
            self.head.load_state_dict(other.head.state_dict())

    def forward(self, x):
        return self.head(torch.tanh(self.c_proj(torch.tanh(self.c_fc(x)))))


@pytest.mark.parametrize("method", ["ec", "taylor", "obd", "jacobian", "sosp-h"])
def test_conv1d_scores_equal_those_of_the_same_linear_layers(method):
    net = Conv1DNet()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    got = pyobc.score(net, [(x, y)], method)
    want = pyobc.score(LinearNet(net), [(x, y)], method)
    assert [g.root for g in got.groups] == [g.root for g in want.groups]
    assert all(float(v.abs().sum()) > 0 for v in want.values)
    for a, b in zip(got.values, want.values):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# -- 4. attention that keeps its head layout in ints -------------------------------------------------------

class Attention(nn.Module):
    """timm's Attention layout: head count and width as ints, the embedding width read from the input."""

    def __init__(self, dim=8, num_heads=2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TinyViT(nn.Module):
    def __init__(self, attention=Attention):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = attention()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def test_int_head_attention_widths_are_left_whole_with_a_warning():
    net = TinyViT()
    x = torch.randn(2, 5, 4)
    with pytest.warns(UserWarning, match=r"module\(s\) that keep head layouts.*\battn\b"):
        scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    assert [g.root for g in scores.groups] == ["fc1"]
    small, _ = pyobc.prune(net, scores, 0.5, scope="local", example_inputs=x)
    assert small(x).shape == (2, 3) and small.fc1.out_features == 8


class TimmAttention(Attention):
    """timm's current layout: the attention width ``attn_dim`` is an attribute, not the input's width."""

    def __init__(self, dim=8, num_heads=4):
        super().__init__(dim, num_heads)
        self.attn_dim = dim
        self.norm = nn.Identity()

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim)))


def test_fused_attention_loses_whole_heads():
    net = TinyViT(attention=TimmAttention)
    x = torch.randn(2, 5, 4)
    with warnings.catch_warnings():  # every attention module loses whole heads: the kept embedding width is by design
        warnings.simplefilter("error")
        scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    group, values = next((g, v) for g, v in zip(scores.groups, scores.values) if g.root == "attn.qkv")
    assert group.size == 4 and [m.kind for m in group.members] == ["out", "in", "heads"]
    with torch.no_grad():
        w, b, p = net.attn.qkv.weight.double(), net.attn.qkv.bias.double(), net.attn.proj.weight.double()
        rows = (w.square().sum(1) + b.square()).reshape(3, 4, 2).sum((0, 2))
        want = rows + p.square().sum(0).reshape(4, 2).sum(1)
    torch.testing.assert_close(values.double(), want, rtol=1e-6, atol=1e-9)

    small, _ = pyobc.prune(net, scores, 0.5, scope="local", example_inputs=x, ignored_layers=["fc1"])
    assert (small.attn.num_heads, small.attn.attn_dim, small.attn.qkv.out_features) == (2, 4, 12)
    gone = torch.argsort(want)[:2]
    with torch.no_grad():  # the same model with the removed heads' contributions zeroed
        ref = TinyViT(attention=TimmAttention)
        ref.load_state_dict(net.state_dict())
        for h in gone.tolist():
            ref.attn.proj.weight[:, 2 * h:2 * h + 2] = 0
        torch.testing.assert_close(small(x), ref(x))


class PatchViT(nn.Module):
    """torchvision's VisionTransformer layout: the patch embedding reshaped with the int ``hidden_dim``."""

    def __init__(self):
        super().__init__()
        self.hidden_dim = 8
        self.conv_proj = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv_proj(x).reshape(x.shape[0], self.hidden_dim, -1).permute(0, 2, 1)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def test_a_width_kept_as_an_int_leaves_its_stream_whole():
    net, x = PatchViT(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"module\(s\) that keep head layouts.*<model>"):
        scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    assert [g.root for g in scores.groups] == ["fc1"]
    small, _ = pyobc.prune(net, scores, 0.5, scope="local", example_inputs=x)
    assert small(x).shape == (2, 3) and small.conv_proj.out_channels == 8


class Hidden(nn.Module):
    """Reshapes with a stored int like an attention module, but nothing names it one."""

    def __init__(self):
        super().__init__()
        self.width = 8
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        return self.mix(x).reshape(x.shape[0], x.shape[1], 2, self.width // 2).flatten(2)


def test_a_pruned_model_that_no_longer_runs_raises_naming_the_layer():
    net = TinyViT(attention=Hidden)
    x = torch.randn(2, 5, 4)
    scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    with pytest.raises(RuntimeError, match=r"does not run.*inside 'attn' \(Hidden\).*ignored_layers=") as info:
        pyobc.prune(net, scores, 0.5, scope="local", example_inputs=x)
    ignore = eval(str(info.value).split("ignored_layers=")[1])
    residual = next(g for g in scores.groups if any(m.module == "attn.mix" for m in g.members))
    assert ignore == [residual.root]
    small, _ = pyobc.prune(net, scores, 0.5, scope="local", example_inputs=x, ignored_layers=ignore)
    assert small(x).shape == (2, 3) and small.attn.mix.out_features == 8


# -- 5. grouped convolutions ---------------------------------------------------------------------------------

class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.d(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))
        return self.head(x.mean((2, 3)))


def test_grouped_convolutions_lose_equal_channels_per_group():
    """Every group touching a grouped convolution keeps a multiple of its group count (exactness of the
    cut: tests/test_grouped_conv.py)."""
    net = GroupedNet()
    x = torch.randn(2, 3, 6, 6)
    scores = pyobc.score(net, None, "magnitude", example_inputs=x)
    assert {g.root: g.divisor for g in scores.groups} == {"a": 2, "b": 2, "c": 4, "d": 4}
    small, _ = pyobc.prune(net, scores, 0.5, scope="local")
    assert (small.a.out_channels, small.b.out_channels, small.c.out_channels, small.d.out_channels) == (4, 4, 4, 4)
    assert small.b.weight.shape[1] == 2 and small.d.weight.shape[1] == 1
    assert small(x).shape == (2, 2)


# -- 6. the bounded group search ---------------------------------------------------------------------------

class Branchy(nn.Module):
    """Concatenation, split and flatten: the index mappings Torch-Pruning follows."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, 5)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        h = self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1))
        h = torch.relu(h)
        p, q = torch.split(h, [5, 3], dim=1)
        h = torch.cat([p, q], 1)
        return self.fc2(F.relu(self.fc(h.flatten(1))[:, :3]))


def _tp_graph(net, x):
    import torch_pruning as tp
    return tp, tp.DependencyGraph().build_dependency(net, example_inputs=x, verbose=False)


def test_search_groups_matches_torch_pruning_get_all_groups():
    net, x = Branchy(), torch.randn(2, 3, 2, 2)
    tp, dg = _tp_graph(net, x)
    want = [[(dep.target.name, dep.handler.__name__, sorted(map(int, idxs))) for dep, idxs in g]
            for g in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear))]
    tp, dg = _tp_graph(net, x)
    names = {id(m): n for n, m in net.named_modules()}
    got, refused = search_groups(dg, net, names, (nn.Conv2d, nn.Linear), [])
    assert refused == []
    assert [[(dep.target.name, dep.handler.__name__, sorted(map(int, idxs))) for dep, idxs in g] for g in got] == want
    assert len(want) == 5  # fc2, fc, c, a, b


def test_search_groups_stops_at_its_time_budget_with_a_clear_error():
    net, x = Branchy(), torch.randn(2, 3, 2, 2)
    with pytest.raises(GroupSearchTimeout, match=r"grouping Branchy took over 0 s .*ignored_layers"):
        build_groups(net, x, seconds=0)


def _records(groups):
    return [(g.root, g.size, g.divisor, [(m.module, m.kind, m.index.tolist(), m.root.tolist(),
                                          [(s.param, s.axis, s.index.tolist()) for s in m.slices]) for m in g.members])
            for g in groups]


def test_groups_are_cached_per_structure_and_equal_a_fresh_trace():
    x = torch.randn(2, 5, 4)
    with pytest.warns(UserWarning, match="attention"):
        first = build_groups(TinyViT(), x)
    with pytest.warns(UserWarning, match="attention"):  # the warning comes with cached groups too
        again = build_groups(TinyViT(), x)  # another instance of the same structure
    assert again[0].members[0].index is first[0].members[0].index
    with pytest.warns(UserWarning, match="attention"):
        fresh = build_groups(TinyViT(), x, cache=False)
    assert fresh[0].members[0].index is not first[0].members[0].index
    assert _records(fresh) == _records(first)
    other = TinyViT()
    other.fc1, other.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
    with pytest.warns(UserWarning, match="attention"):
        assert [g.size for g in build_groups(other, x)] == [12]
    with pytest.warns(UserWarning, match="attention"):  # other inputs: traced again
        assert build_groups(TinyViT(), torch.randn(2, 7, 4))[0].members[0].index is not first[0].members[0].index


# -- real classes (timm, transformers) on tiny configurations --------------------------------------------------

def _timm():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm
    return timm


def _transformers():
    _timm()  # transformers imports torchvision when it is installed
    import transformers
    return transformers


def _check_indices(groups, model):
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for g in groups:
        for m in g.members:
            for s in m.slices:
                n = shapes[s.param][1] * s.groups if s.axis == -1 else shapes[s.param][s.axis]
                assert int(s.index.max()) < n, (g.root, s.param)


def test_efficientvit_groups_index_inside_their_tensors_and_ec_runs():
    net = _timm().create_model("efficientvit_b0", pretrained=False, num_classes=4).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    with pytest.warns(UserWarning, match="outside the tensors: .*qkv"):
        scores = pyobc.score(net, [(x, y)], "ec")
    _check_indices(scores.groups, net)
    assert all(bool(torch.isfinite(v).all()) for v in scores.values)


def _lm(name):
    T = _transformers()
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=32))
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**cfg, num_labels=3))
    return T.Qwen3ForCausalLM(T.Qwen3Config(**cfg, num_key_value_heads=2, head_dim=16))


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "bert"])
def test_transformers_with_labels_prune_and_keep_their_outputs(name):
    net = _lm(name)
    ids = torch.randint(0, 256, (2, 16))
    labels = torch.tensor([0, 2]) if name == "bert" else ids
    batch = {"input_ids": ids, "labels": labels}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = pyobc.score(net, [batch], "taylor", loss_fn=lambda m, b: m(**b).loss)
        small, _ = pyobc.prune(net, scores, 0.3, scope="local", example_inputs={"input_ids": ids})
    head = {"gpt2": "lm_head", "qwen3": "lm_head", "bert": "classifier"}[name]
    assert all(m.module != head or m.kind == "in" for g in scores.groups for m in g.members)
    with torch.no_grad():
        assert small(input_ids=ids).logits.shape == net(input_ids=ids).logits.shape
    if name == "gpt2":
        assert small.lm_head.weight is small.transformer.wte.weight
        assert any(m.module_type == "Conv1D" for g in scores.groups for m in g.members)
