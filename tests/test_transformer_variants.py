"""Decoder variants beyond the Llama layout: fused gate/up MLPs (Phi-3), attention with a norm over the
whole query vector (OLMo-2), and the models whose hidden width pyobc refuses to cut (Gemma).

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
