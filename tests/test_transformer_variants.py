"""Decoder variants beyond the Llama layout: fused gate/up MLPs (Phi-3), attention with a norm over the
whole query vector (OLMo-2) or one norm per head (StableLM), and the models whose hidden width pyobc refuses
to cut (Gemma).

Every cut is compared with the unpruned model whose removed neurons are zeroed by hand.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pyobc
from pyobc.pruning.slicing import apply_remove

pytestmark = pytest.mark.usefixtures("float64")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_fused_gate_up_neurons_equal_zeroed_neurons():
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL)).eval()
    groups = pyobc.score(model, [_ids()], "taylor").groups
    mlp = next(g for g in groups if g.root == "model.layers.0.mlp.gate_up_proj")
    assert mlp.size == 12 and [m.kind for m in mlp.members] == ["out", "in"]
    gone = torch.tensor([0, 5, 11])
    small = copy.deepcopy(model)
    apply_remove(small, groups, {mlp.root: gone})
    ref = copy.deepcopy(model)
    with torch.no_grad():  # neuron i = gate row i, up row 12 + i, down column i
        ref.model.layers[0].mlp.down_proj.weight[:, gone] = 0
    assert small.model.layers[0].mlp.gate_up_proj.out_features == 18 and small.config.intermediate_size == 12
    torch.testing.assert_close(small(_ids(1)).logits, ref(_ids(1)).logits)
    uniform, _ = pyobc.prune(model, pyobc.score(model, [_ids()], "jacobian"), 0.5, scope="local",
                             example_inputs=_ids())
    assert uniform.config.intermediate_size == 6 and uniform(_ids(1)).logits.shape == (2, 7, 64)


def test_attention_with_a_norm_over_all_heads_is_left_whole():
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SMALL)).eval()
    with pytest.warns(UserWarning, match="self_attn"):
        scores = pyobc.score(model, [_ids()], "jacobian")
    assert not any(m.kind == "heads" for g in scores.groups for m in g.members)
    small, _ = pyobc.prune(model, scores, 0.5, scope="local", example_inputs=_ids())
    assert small(_ids(1)).logits.shape == (2, 7, 64)


def test_gemma_heads_are_cut_but_not_its_hidden_width():
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=4, **SMALL)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scores = pyobc.score(model, [_ids()], "jacobian")
    small, _ = pyobc.prune(model, scores, 0.5, scope="local", example_inputs=_ids())
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    with pytest.raises(ValueError, match="model_type='gemma'"):
        pyobc.score(model, [_ids()], "jacobian", hidden=True)


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_stablelm_per_head_norms_keep_their_heads(qk_layernorm):
    """StableLM's ``qk_layernorm`` applies a list of one LayerNorm per head in head order: a head cut would
    hand the kept heads the first heads' norms (silently wrong outputs), so those attentions keep their
    heads, with a warning. Without it, whole heads go as in Llama."""
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(transformers.StableLmConfig(**SMALL, qk_layernorm=qk_layernorm)).eval()
    with torch.no_grad():  # per-head norms that differ, so that a mix-up shows
        for name, p in model.named_parameters():
            if "norms" in name:
                p.uniform_(0.5, 1.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = pyobc.score(model, [_ids()], "jacobian")
    heads = [g for g in scores.groups if any(m.kind == "heads" for m in g.members)]
    assert len(heads) == (0 if qk_layernorm else 2)
    assert any("self_attn" in str(w.message) for w in caught) == qk_layernorm
    # every head group loses its lowest-scoring kv head, the MLPs half their neurons: compare with zeroing
    small, _ = pyobc.prune(model, scores, 0.5, scope="local", target="channels", example_inputs=_ids())
    ref = copy.deepcopy(model)
    d = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for old, new in zip(ref.model.layers, small.model.layers):
            a, b = old.self_attn, new.self_attn
            kept_kv = [i for i in range(a.k_proj.out_features // d)
                       if any(torch.equal(a.k_proj.weight[i * d:(i + 1) * d], b.k_proj.weight[j * d:(j + 1) * d])
                              for j in range(b.k_proj.out_features // d))]
            per = a.num_key_value_groups
            for kv in set(range(a.k_proj.out_features // d)) - set(kept_kv):
                a.o_proj.weight[:, kv * per * d:(kv + 1) * per * d] = 0
            kept_ff = [i for i in range(old.mlp.up_proj.out_features)
                       if any(torch.equal(old.mlp.up_proj.weight[i], r) for r in new.mlp.up_proj.weight)]
            gone = sorted(set(range(old.mlp.up_proj.out_features)) - set(kept_ff))
            old.mlp.down_proj.weight[:, gone] = 0
    assert small.model.layers[0].mlp.up_proj.out_features == SMALL["intermediate_size"] // 2
    torch.testing.assert_close(small(_ids(1)).logits, ref(_ids(1)).logits)


def test_mixture_of_experts_weights_stay_whole_with_a_warning():
    """transformers 5 keeps a MoE layer's experts as one 3-d tensor per projection: no structure of theirs is
    found, and the user is told so (they hold most of the model), while the attention heads are still cut."""
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SMALL)).float().eval()
    with pytest.warns(UserWarning, match=r"no prunable group.*experts\.(gate_up|down)_proj"):
        scores = pyobc.score(model, [_ids()], "taylor")
    assert scores.groups and all("experts" not in s.param for g in scores.groups for m in g.members
                                 for s in m.slices)
    small, _ = pyobc.prune(model, scores, 0.5, scope="local", target="channels", example_inputs=_ids())
    assert small.config.num_key_value_heads == 1 and small(_ids(1)).logits.shape == (2, 7, 64)
