"""``pyobc demo --lm``'s machinery on a tiny random Llama (no training): rows, removal shares, perplexities.

The expected parameter counts are written out from the architecture, and the unpruned perplexity is
recomputed with plain cross-entropy, never with pyobc's own counting or metrics.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import pyobc
from pyobc.demo_lm import (
    LMCriterion,
    LMDemoSettings,
    LMJob,
    lm_rows,
    prunable_params,
    run_lm_demo,
    select_criteria,
)

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("transformers")

VOCAB = 32
# hidden 16, 4 query heads sharing 2 KV heads of 4 dims, SwiGLU 12: per layer q 16x16, k and v 8x16, o 16x16,
# gate and up 12x16, down 16x12 = 768 attention + 576 MLP = 1344 prunable; embeddings 2 x 32x16, 3 norms of 16
PRUNABLE, TOTAL = 1344, 1344 + 2 * VOCAB * 16 + 3 * 16


def tiny(layers: int = 1):
    torch.manual_seed(0)
    return pyobc.models.tiny_llama(hidden_size=16, intermediate_size=12, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=4, vocab_size=VOCAB,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2).eval()


def streams():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (1200,), generator=g), torch.randint(0, VOCAB, (160,), generator=g)


SETTINGS = LMDemoSettings(ratios=(0.1,), batches=2, batch_size=2, seq_len=16, validation_tokens=160,
                          recovery_steps=2, threads=None)


def hand_perplexity(model, tokens: torch.Tensor, seq_len: int) -> float:
    n = tokens.numel() // seq_len
    windows = tokens[: n * seq_len].reshape(n, seq_len)
    with torch.no_grad():
        z = model(windows).logits
    return math.exp(float(F.cross_entropy(z[:, :-1].reshape(-1, VOCAB).double(), windows[:, 1:].reshape(-1))))


def test_prunable_params_by_hand():
    model = tiny(layers=2)
    groups = pyobc.build_groups(model, torch.zeros(2, 8, dtype=torch.long))
    assert prunable_params(groups, model) == 2 * PRUNABLE
    assert sum(p.numel() for p in model.parameters()) == TOTAL + PRUNABLE + 2 * 16  # a second layer and its norms


def test_demo_one_criterion_one_ratio():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, test = streams()
    out = io.StringIO()
    rows = run_lm_demo(["jacobian"], settings=SETTINGS, model=model, train_tokens=train, test_tokens=test, out=out)
    assert [r.criterion for r in rows] == ["jacobian"]
    r = rows[0]
    removed = TOTAL - r.params_after
    assert removed >= 0.1 * TOTAL and r.removed_all == pytest.approx(removed / TOTAL)
    assert r.removed_prunable == pytest.approx(removed / PRUNABLE)
    assert r.scope == "global" and r.ratio == 0.1
    # the only row is the best one, so it is recovered; reconstruction ran; everything is a perplexity
    for value in (r.validation_ppl, r.ppl, r.reconstructed_ppl, r.recovered_ppl):
        assert value is not None and 1.0 < value < 10 * VOCAB
    text = out.getvalue()
    assert "seq_len 16" in text and "2 batches of 2x16 tokens" in text and "ALL parameters" in text
    unpruned = next(line for line in text.splitlines() if line.startswith("(unpruned)")).split()
    assert int(unpruned[1]) == TOTAL
    assert float(unpruned[3]) == pytest.approx(hand_perplexity(model, test, 16), abs=6e-4)  # printed with 3 decimals
    assert float(unpruned[2]) == pytest.approx(hand_perplexity(model, train[-160:], 16), abs=6e-4)
    # the user's model is untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_uniform_magnitude_with_and_without_heads():
    """Uniform (local) magnitude at 10% of all parameters, by hand: the smallest fraction f of every group whose
    removal reaches 242 parameters. With heads: f = 0.25 rounds to 1 of 2 KV heads (384 parameters) plus 3 of
    12 neurons (3 x 48), 528 in all (f = 0.24 keeps the heads and removes only 144). Attention kept whole:
    6 neurons, 288."""
    train, test = streams()
    job = LMJob.build(tiny(), train, test, LMDemoSettings(**{**SETTINGS.__dict__, "recovery_steps": 0,
                                                             "reconstruct": False}))
    criteria = (LMCriterion("magnitude (uniform) [TP]", "magnitude", scope="local"),
                LMCriterion("mlp only", "magnitude", scope="local", keep_heads=True))
    rows = lm_rows(job, criteria)
    assert [TOTAL - r.params_after for r in rows] == [528, 288]
    assert all(r.recovered_ppl is None and r.reconstructed_ppl is None for r in rows)
    assert rows[0].seconds == rows[1].seconds  # magnitude scored once, shared by both rows


def test_criteria_selection_and_cli_error(capsys):
    assert [c.label for c in select_criteria(["magnitude"])] == [
        "magnitude (uniform) [TP]", "magnitude (uniform MLP) [TP]", "magnitude (global)"]
    assert len(select_criteria(None)) == 9
    from pyobc.cli import main

    assert main(["demo", "--lm", "--methods", "ec"]) == 2  # a criterion, but not one of the LM demo's
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyobc: error: none of ['ec']")
