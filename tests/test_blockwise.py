"""Block-by-block scoring (pyobc.blockwise) on a tiny float64 Llama.

The output gradients that drive every layer's linearised loss are checked against plain autograd on the
whole model (hooks that keep each layer's output gradient); the first-order criteria against the
whole-model scores, which tests/test_criteria.py and tests/test_transformer_heads.py check against
independent computations; OBA's difference from the whole-model scores is measured.
"""
from __future__ import annotations

import pytest
import torch

import pyobc
from pyobc import blockwise
from pyobc.errors import EmptyLoaderError
from pyobc.losses import causal_lm

pytestmark = pytest.mark.usefixtures("float64")
transformers = pytest.importorskip("transformers")


def _llama(layers: int = 3):
    torch.manual_seed(0)
    return pyobc.models.tiny_llama(hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                   attn_implementation="sdpa")


def _loader():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 259, (3, 7), generator=g) for _ in range(2)]


def _by_root(scores):
    return {g.root: v for g, v in zip(scores.groups, scores.values)}


def test_output_gradients_match_autograd_on_the_whole_model():
    model, ids = _llama(), _loader()[0]
    _, layers = blockwise.decoder_layers(model)
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    causal_lm(model, ids).backward()
    for h in handles:
        h.remove()
    want = [o.grad * ids.shape[0] for o in outputs]  # per-sample gradients of a mean loss
    calls = blockwise._record(model, layers, causal_lm, ids)
    got = [blockwise._output_gradient(model, layers, calls, causal_lm, ids, ids.shape[0])]
    for i in reversed(range(1, len(layers))):
        got.insert(0, blockwise._vjp(layers[i], calls[i], got[0]))
    for g, w in zip(got, want):  # Llama's RMSNorm computes in float32 even in a float64 model
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)  # the stand-ins were put back


@pytest.mark.parametrize("method", ["taylor", "jacobian", "obd", "magnitude"])
@pytest.mark.parametrize("heads", ["kv", "query"])
def test_first_order_criteria_equal_whole_model_scores(method, heads):
    model, loader = _llama(), _loader()
    whole = _by_root(pyobc.score(model, loader, method, loss_fn=causal_lm, heads=heads))
    blocks = _by_root(pyobc.score(model, loader, method, loss_fn=causal_lm, heads=heads, blockwise=True))
    assert set(blocks) == set(whole) and len(whole) == 6  # 3 layers x (heads, MLP neurons)
    for root, v in whole.items():
        torch.testing.assert_close(blocks[root], v, rtol=1e-6, atol=1e-12)


def test_oba_keeps_only_the_curvature_inside_each_layer():
    """OBA's blockwise scores differ from the whole model's (blocks between layers and the later layers'
    curvature are dropped) but are OBA scores of the same groups: finite, the same shapes, and for every
    MLP channel the within-layer term is part of the whole-model one."""
    model, loader = _llama(), _loader()
    whole = _by_root(pyobc.score(model, loader, "oba", loss_fn=causal_lm, normalize="none"))
    blocks = _by_root(pyobc.score(model, loader, "oba", loss_fn=causal_lm, normalize="none", blockwise=True))
    assert {k: v.shape for k, v in blocks.items()} == {k: v.shape for k, v in whole.items()}
    assert all(bool(torch.isfinite(v).all()) for v in blocks.values())
    diff = max(float((blocks[k] - whole[k]).abs().max() / whole[k].abs().max()) for k in whole)
    assert diff > 1e-3  # a different (layer-local) quantity: if this ever fails, the docs are wrong


def test_blockwise_scores_prune_a_working_model():
    model, loader = _llama(), _loader()
    scores = pyobc.score(model, loader, "jacobian", loss_fn=causal_lm, blockwise=True)
    small, _ = pyobc.prune(model, scores, 0.3, target="params")
    assert small(loader[0]).logits.shape == (3, 7, 259)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_blockwise_leaves_the_model_as_it_was():
    model, loader = _llama(), _loader()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list(blockwise.decoder_layers(model)[1])
    pyobc.score(model, loader, "oba", loss_fn=causal_lm, blockwise=True)
    assert model.training and list(blockwise.decoder_layers(model)[1]) == layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["sosp-h", "ec", "oracle", "sosp-i"])
def test_methods_without_a_linearised_form_are_refused(method):
    with pytest.raises(ValueError, match="cannot be scored block by block"):
        pyobc.score(_llama(1), _loader(), method, loss_fn=causal_lm, blockwise=True)


def test_bad_arguments():
    model, loader = _llama(1), _loader()
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        pyobc.score(model, loader, "jacobian", blockwise=True, loss_fn=3)
    with pytest.raises(ValueError, match="no stack of transformer layers"):
        pyobc.score(torch.nn.Sequential(torch.nn.Linear(2, 2)), loader, "jacobian", loss_fn=causal_lm,
                    blockwise=True)
    with pytest.raises(ValueError, match="channel scores only"):
        pyobc.score(model, loader, "taylor", loss_fn=causal_lm, blockwise=True, granularity="weight")
    with pytest.raises(EmptyLoaderError):
        pyobc.score(model, [], "taylor", loss_fn=causal_lm, blockwise=True)
    with pytest.raises(ValueError, match="does not take"):
        pyobc.score(model, loader, "taylor", loss_fn=causal_lm, blockwise=True, ignored_layers=["lm_head"])
