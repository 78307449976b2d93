"""The LLM pruning baselines as pyobc options, against hand computation on tiny float64 nets.

- LLM-Pruner's first-order element-wise Taylor: ``pyobc.score(..., "taylor", form="elementwise")`` =
  ``sum_{i in channel} |theta_i * mean_t g_{i,t}|`` (the gradient averaged over batches before the abs).
- Torch-Pruning's LLM recipe: ``magnitude`` (p=2, group sum of squares) with ``pyobc.prune(scope="local")``.

Expected values come from plain autograd and the networks' structure written out by hand (which weights go
with which channel), never from pyobc's grouping or layout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyobc

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    """fc1(4->5) -> bn(5) -> tanh -> fc2(5->6) -> tanh -> fc3(6->3).

    Groups: fc1 channel c = {fc1.W[c], fc1.b[c], bn.weight[c], bn.bias[c], fc2.W[:, c]};
            fc2 channel c = {fc2.W[c], fc2.b[c], fc3.W[:, c]}.
    """

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 6), nn.Linear(6, 3)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.3, 0.3)
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.bn(self.fc1(x))))))


def by_hand(model: Net, per_weight: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Group sums of a per-weight score, written out from the structure of :class:`Net`."""
    a = per_weight
    return {
        "fc1": a["fc1.weight"].sum(1) + a["fc1.bias"] + a["bn.weight"] + a["bn.bias"] + a["fc2.weight"].sum(0),
        "fc2": a["fc2.weight"].sum(1) + a["fc2.bias"] + a["fc3.weight"].sum(0),
    }


def batch_grads(model: nn.Module, batch, loss=None) -> dict[str, torch.Tensor]:
    model.eval()
    params = dict(model.named_parameters())
    value = loss(model, batch) if loss is not None else F.cross_entropy(model(batch[0]), batch[1])
    return dict(zip(params, torch.autograd.grad(value, list(params.values()))))


@pytest.fixture()
def setup(float64):
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    return model, [(x[:5], y[:5]), (x[5:9], y[5:9]), (x[9:], y[9:])]


def test_elementwise_taylor_by_hand(setup):
    model, loader = setup
    theta = {n: p.detach() for n, p in model.named_parameters()}
    grads = [batch_grads(model, b) for b in loader]
    mean_g = {n: sum(g[n] for g in grads) / len(grads) for n in theta}  # gradient averaged over batches
    per_weight = {n: (theta[n] * mean_g[n]).abs() for n in theta}  # then abs, per weight
    expected = by_hand(model, per_weight)
    scores = pyobc.score(model, loader, "taylor", form="elementwise", granularity="weight")
    got = scores.by_module()
    assert set(got) == {"fc1", "fc2"}
    for root in expected:
        torch.testing.assert_close(got[root].double(), expected[root], rtol=1e-9, atol=1e-15)
    for name, value in scores.by_parameter().items():
        torch.testing.assert_close(value.double(), per_weight[name], rtol=1e-9, atol=1e-15)
    # the default form is still the group form (Molchanov): mean over batches of the squared group sum
    group = pyobc.score(model, loader, "taylor").by_module()
    per_batch = [by_hand(model, {n: theta[n] * g[n] for n in theta}) for g in grads]
    torch.testing.assert_close(group["fc1"].double(), sum(b["fc1"] ** 2 for b in per_batch) / len(loader),
                               rtol=1e-9, atol=1e-15)


def test_taylor_form_is_validated(setup):
    model, loader = setup
    with pytest.raises(ValueError, match="form='rowwise' must be one of"):
        pyobc.score(model, loader, "taylor", form="rowwise")


class Linear2(nn.Module):
    """fc1(2->2, no bias) -> fc2(2->1): channel c of fc1 = {fc1.W[c], fc2.W[:, c]}; no activation."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 1)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.8]]))
            self.fc2.weight.copy_(torch.tensor([[0.7, -0.4]]))
            self.fc2.bias.fill_(0.1)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x).squeeze(1), y)


def test_elementwise_differs_from_group_where_signs_cancel_within_a_channel(float64):
    """x = (1, 1) and fc1.W[0] = (1, -1): theta*g of the two weights of channel 0 are +d and -d, and its
    activation is 0, so the consumer column adds nothing. The group form sees 0, the element-wise form 2|d|."""
    model = Linear2()
    batch = (torch.tensor([[1.0, 1.0]]), torch.tensor([2.0]))
    g = batch_grads(model, batch, _mse)
    d = float(g["fc1.weight"][0, 0])  # = dL/dh_0 * x_0
    assert abs(d) > 0.1
    group = pyobc.score(model, [batch], "taylor", loss_fn=_mse).by_module()["fc1"]
    elementwise = pyobc.score(model, [batch], "taylor", form="elementwise", loss_fn=_mse).by_module()["fc1"]
    assert float(group[0]) == pytest.approx(0.0, abs=1e-24)
    assert float(elementwise[0]) == pytest.approx(2 * abs(d), rel=1e-12)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    expected_1 = (theta["fc1.weight"][1] * g["fc1.weight"][1]).abs().sum() + (theta["fc2.weight"][:, 1]
                                                                              * g["fc2.weight"][:, 1]).abs().sum()
    torch.testing.assert_close(elementwise[1].double(), expected_1, rtol=1e-12, atol=0.0)
    # and the two forms rank the channels differently: channel 0 is the least important only for the group form
    assert float(group[0]) < float(group[1])
    assert float(elementwise[0]) > float(elementwise[1])


def test_elementwise_averages_gradients_over_batches_before_the_abs(float64):
    """Two batches whose gradients are exact opposites: the mean gradient is 0, so every element-wise score
    is 0, while the group form (mean of per-batch squares) is not."""
    model = Linear2()
    x = torch.tensor([[0.3, -1.2]])
    out = float(model(x).detach())
    loader = [(x, torch.tensor([out + 1.0])), (x, torch.tensor([out - 1.0]))]  # residuals -1 and +1
    elementwise = pyobc.score(model, loader, "taylor", form="elementwise", loss_fn=_mse).by_module()["fc1"]
    group = pyobc.score(model, loader, "taylor", loss_fn=_mse).by_module()["fc1"]
    assert float(elementwise.abs().max()) < 1e-12
    assert float(group.min()) > 1e-3


def test_torch_pruning_llm_recipe_is_local_magnitude(setup):
    """Magnitude (p=2) with scope="local": every group loses the same fraction, its smallest sums of squares."""
    model, loader = setup
    sq = by_hand(model, {n: p.detach() ** 2 for n, p in model.named_parameters()})
    scores = pyobc.score(model, None, "magnitude", example_inputs=loader[0][0][:2])
    for root in sq:
        torch.testing.assert_close(scores.by_module()[root].double(), sq[root])
    _, report = pyobc.prune(model, scores, 0.4, scope="local")
    sizes = {"fc1": 5, "fc2": 6}
    for root, size in sizes.items():
        k = int(0.4 * size + 0.5)  # round(ratio * size) channels of every group
        expected = torch.sort(torch.argsort(sq[root])[:k]).values
        assert torch.equal(report.removed[root].cpu(), expected), root


def _tiny_llama():
    return pyobc.models.tiny_llama(hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=4, attn_implementation="eager")


def test_elementwise_taylor_on_llama_kv_heads_by_hand(float64):
    """Whole KV heads (each with its 2 query heads) and SwiGLU neurons of a tiny Llama, written out by hand."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _tiny_llama().eval()
    loader = [torch.randint(0, 259, (2, 6)), torch.randint(0, 259, (3, 6))]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    grads = [batch_grads(model, b, pyobc.losses.causal_lm) for b in loader]
    a = {n: (theta[n] * sum(g[n] for g in grads) / 2).abs() for n in theta}
    p = "model.layers.0."
    heads = torch.stack([  # KV head h: query rows/o columns 8h..8h+7 (2 heads of 4), key/value rows 4h..4h+3
        a[p + "self_attn.q_proj.weight"][8 * h:8 * h + 8].sum() + a[p + "self_attn.o_proj.weight"][:, 8 * h:8 * h + 8].sum()
        + a[p + "self_attn.k_proj.weight"][4 * h:4 * h + 4].sum() + a[p + "self_attn.v_proj.weight"][4 * h:4 * h + 4].sum()
        for h in range(2)])
    mlp = (a[p + "mlp.gate_proj.weight"].sum(1) + a[p + "mlp.up_proj.weight"].sum(1)
           + a[p + "mlp.down_proj.weight"].sum(0))
    got = pyobc.score(model, loader, "taylor", form="elementwise", loss_fn=pyobc.losses.causal_lm,
                      heads="kv").by_module()
    torch.testing.assert_close(got[p + "self_attn.q_proj"].double(), heads, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got[p + "mlp.up_proj"].double(), mlp, rtol=1e-9, atol=1e-15)
