"""The hidden width of a Llama-family decoder, pruned on request (pyobc.hidden_width).

The cut model is compared with the unpruned one whose removed hidden channels are zeroed by hand (the
embedding's columns and the rows of every projection that writes the residual stream), with RMSNorm's
eps = 0 and computed in float64, where the rescaled norms make the two equal.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pyobc
from pyobc.pruning.slicing import apply_remove

pytestmark = pytest.mark.usefixtures("float64")
transformers = pytest.importorskip("transformers")


class _RMSNorm64(transformers.models.llama.modeling_llama.LlamaRMSNorm):
    """LlamaRMSNorm's formula in the input's dtype (the original computes in float32)."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _llama(tie: bool = False):
    torch.manual_seed(0)
    m = pyobc.models.tiny_llama(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=4, rms_norm_eps=0.0, tie_word_embeddings=tie)
    for mod in m.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.__class__ = _RMSNorm64
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
    return m


def _zeroed(model, gone):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, gone] = 0
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight[gone] = 0
            layer.mlp.down_proj.weight[gone] = 0
    return ref


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_cut_equals_zeroed_channels(tie):
    model, ids = _llama(tie), torch.randint(0, 259, (2, 8), generator=torch.Generator().manual_seed(1))
    groups = pyobc.score(model, [ids], "taylor", hidden=True).groups
    hidden = next(g for g in groups if g.root == "model.embed_tokens")
    assert hidden.size == 16 and {m.kind for m in hidden.members} == {"embedding", "out", "in", "hidden_norm"}
    gone = torch.tensor([1, 3, 10, 15])
    small = copy.deepcopy(model)
    apply_remove(small, groups, {"model.embed_tokens": gone})
    assert small.config.hidden_size == 12 and small.model.layers[0].mlp.hidden_size == 12
    assert small.lm_head.weight.shape == (259, 12) and (small.lm_head.weight is small.model.embed_tokens.weight) == tie
    torch.testing.assert_close(small(ids).logits, _zeroed(model, gone)(ids).logits, rtol=1e-9, atol=1e-9)


def test_hidden_prune_round_trips_and_generates(tmp_path):
    model, ids = _llama(), torch.randint(0, 259, (2, 8), generator=torch.Generator().manual_seed(2))
    scores = pyobc.score(model, [ids], "jacobian", hidden=True)
    small, report = pyobc.prune(model, scores, 0.25, scope="local")
    assert "model.embed_tokens" in report.removed and small.config.hidden_size == 16 - 4
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    torch.testing.assert_close(again(ids).logits, small(ids).logits, rtol=1e-6, atol=1e-6)
    assert small.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_hidden_is_only_on_request_and_only_for_llama_family():
    model, ids = _llama(), torch.randint(0, 259, (2, 8))
    assert all(g.root != "model.embed_tokens" for g in pyobc.score(model, [ids], "magnitude").groups)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=259, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="Llama-family decoders only.*gpt2 attention"):
        pyobc.score(gpt2, [ids], "magnitude", hidden=True)
    with pytest.raises(ValueError, match="no Hugging Face config"):
        pyobc.score(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), None, "magnitude",
                    example_inputs=torch.randn(2, 4), hidden=True)
    with pytest.raises(ValueError, match="spans every layer"):
        pyobc.score(model, [ids], "taylor", hidden=True, blockwise=True)


@pytest.mark.parametrize("heads", ["kv", "query"])
def test_hidden_and_query_head_cuts_round_trip_through_pyobc_save(tmp_path, heads):
    model, ids = _llama(), torch.randint(0, 259, (2, 8), generator=torch.Generator().manual_seed(3))
    scores = pyobc.score(model, [ids], "taylor", hidden=True, heads=heads)
    small, _ = pyobc.prune(model, scores, 0.5, scope="local", example_inputs=ids)
    assert small.config.hidden_size == 8
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == ((2, 1) if heads == "kv" else (2, 2))
    pyobc.save(small, tmp_path / "small.pt")
    again = pyobc.load(_llama(), tmp_path / "small.pt")
    torch.testing.assert_close(again(ids).logits, small(ids).logits)
    assert again.config.hidden_size == 8 and again.config.num_key_value_heads == small.config.num_key_value_heads
