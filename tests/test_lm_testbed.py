"""The offline language-model test bed: byte tokenizer, text corpus and its split, the token-batch loader,
perplexity, the causal-LM loss, and the cached tiny Llama trained on the corpus.

Every figure is compared with an independent computation: byte strings from Python itself, explicit
loops over windows with ``F.cross_entropy``, counts with :class:`collections.Counter`, and Hugging Face's
own loss.
"""
from __future__ import annotations

import collections
import hashlib
import math
import os
import subprocess
import sys
import types

# transformers imports torchvision when it is installed; the CUDA build of torchvision in this
# environment fails in its meta registrations against the CPU torch. Text models need none of it.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyobc  # noqa: E402
from pyobc import corpus, datasets, losses, metrics, models  # noqa: E402
from pyobc.losses import causal_lm  # noqa: E402

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = corpus.VOCAB_SIZE


def _tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    fields.update(overrides)
    return models.tiny_llama(**fields)


# ------------------------------------------------------------------------------------------ tokenizer

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trip(text):
    tok = corpus.ByteTokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [corpus.BOS] + list(text.encode("utf-8")) + [corpus.EOS]
    assert tok.decode(ids) == text


def test_tokenizer_batch_and_errors():
    tok = corpus.ByteTokenizer()
    batch = tok(["é", "ab"])
    assert batch["input_ids"].tolist() == [[0xC3, 0xA9], [97, 98]]
    batch = tok(["a", "abc"], eos=True)
    assert batch["input_ids"].tolist() == [[97, corpus.EOS, corpus.PAD, corpus.PAD], [97, 98, 99, corpus.EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert tok.decode([0xC3]) == "\ufffd"  # a cut character is replaced, not an exception
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([V])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[1, 2]])


# ------------------------------------------------------------------------------------- corpus, split

def test_split_is_disjoint_covering_and_about_ten_percent():
    table = corpus.topics()
    train, test = corpus.split_topics("train"), corpus.split_topics("test")
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(table)
    assert train == sorted(train) and test == sorted(test) and len(test) >= 1
    size = {k: len(v.encode("utf-8")) for k, v in table.items()}
    held = sum(size[k] for k in test) / sum(size.values())
    assert corpus.TEST_FRACTION <= held <= corpus.TEST_FRACTION + max(size.values()) / sum(size.values())
    with pytest.raises(ValueError, match="split"):
        corpus.split_topics("validation")


def test_split_is_deterministic_across_processes_and_transformers_is_optional():
    # a fresh interpreter with another string-hash seed must choose the same topics and tokens; and
    # importing pyobc and its language-model modules must not import transformers
    code = ("import hashlib, sys, pyobc, pyobc.models, pyobc.datasets, pyobc.losses, pyobc.metrics\n"
            "import pyobc.corpus as c\n"
            "print('transformers' in sys.modules)\n"
            "print(c.split_topics('test'))\n"
            "print(hashlib.sha256(c.token_stream('test').numpy().tobytes()).hexdigest())\n"
            "sys.modules['transformers'] = None\n"
            "try:\n    pyobc.models.tiny_llama()\nexcept ImportError as e:\n    print(e)\n")
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.strip().split("\n")
    assert lines[0] == "False"
    assert lines[1:3] == [str(corpus.split_topics("test")),
                          hashlib.sha256(corpus.token_stream("test").numpy().tobytes()).hexdigest()]
    assert "pip install transformers" in lines[3]


def test_token_streams_are_the_topics_bytes():
    table = corpus.topics()
    for split in ("train", "test"):
        expected = []
        for key in sorted(corpus.split_topics(split)):
            expected += [corpus.BOS] + list(table[key].encode("utf-8")) + [corpus.EOS]
        stream = datasets.text_tokens(split)
        assert stream.dtype == torch.int64 and stream.tolist() == expected
    stream[:] = 0  # a fresh copy each call
    assert int(datasets.text_tokens("test")[0]) == corpus.BOS


def test_text_loader_windows():
    stream = datasets.text_tokens("train")
    rng = torch.get_rng_state()
    loader = datasets.text("train", seq_len=100, batch_size=64, seed=3)
    first = torch.cat(list(loader))
    assert torch.equal(rng, torch.get_rng_state())
    n = stream.numel() // 100
    assert first.shape == (n, 100) and first.dtype == torch.int64
    expected = stream[: n * 100].reshape(n, 100)
    order = sorted(range(n), key=lambda i: first[i].tolist())
    assert torch.equal(first[order], expected[sorted(range(n), key=lambda i: expected[i].tolist())])
    assert not torch.equal(first, expected)  # shuffled
    again = torch.cat(list(datasets.text("train", seq_len=100, batch_size=64, seed=3)))
    assert torch.equal(first, again)
    test = torch.cat(list(datasets.text("test", seq_len=100, batch_size=7)))
    assert torch.equal(test, datasets.text_tokens("test")[: test.numel()].reshape(-1, 100))
    with pytest.raises(ValueError, match="seq_len"):
        datasets.text("test", seq_len=1)
    with pytest.raises(ValueError, match="longer than"):
        datasets.text("test", seq_len=10**7)


# -------------------------------------------------------------------------------------- perplexity

def _brute_force_perplexity(model, tokens, seq_len):
    nll, count = 0.0, 0
    for start in range(0, tokens.numel() - seq_len + 1, seq_len):
        window = tokens[start:start + seq_len][None]
        with torch.no_grad():
            out = model(window)
        z = (out.logits if hasattr(out, "logits") else out)[0].double()
        nll += float(F.cross_entropy(z[:-1], window[0, 1:], reduction="sum"))
        count += seq_len - 1
    return math.exp(nll / count), count


def test_perplexity_matches_a_loop_over_windows():
    model = _tiny_llama(attention_dropout=0.5).train()  # dropout on: perplexity must switch it off
    model.model.layers[0].mlp.train(False)              # and give every submodule its own flag back
    tokens = datasets.text_tokens("test")[:1000]        # 7 windows of 137 and a dropped remainder
    model.eval()
    expected, count = _brute_force_perplexity(model, tokens, 137)
    model.train()
    model.model.layers[0].mlp.train(False)
    for batch_size in (1, 16):
        got = metrics.perplexity(model, tokens, seq_len=137, batch_size=batch_size)
        assert got.perplexity == pytest.approx(expected, rel=1e-5)
        assert (got.seq_len, got.windows, got.predicted_tokens) == (137, 7, count)
        assert got.nll == pytest.approx(math.log(expected), rel=1e-5)
    assert model.training and not model.model.layers[0].mlp.training
    assert "seq_len 137" in str(got) and "seq_len=137" in repr(got)
    assert float(metrics.perplexity(model, tokens[None], 137)) == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_known_models():
    tokens = torch.randint(0, V, (5000,), generator=torch.Generator().manual_seed(0))
    uniform = lambda ids: torch.zeros(*ids.shape, V)  # noqa: E731
    assert float(metrics.perplexity(uniform, tokens, seq_len=128)) == pytest.approx(V, rel=1e-12)
    # a model that puts probability p on the true next token and spreads the rest evenly
    p = 0.7
    def calibrated(ids):
        z = torch.full((*ids.shape, V), math.log((1 - p) / (V - 1)), dtype=torch.float64)
        return {"logits": z.scatter(-1, ids.roll(-1, 1)[..., None], math.log(p))}
    assert float(metrics.perplexity(calibrated, tokens, seq_len=64)) == pytest.approx(1 / p, rel=1e-12)


def test_perplexity_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        metrics.perplexity(lambda ids: torch.zeros(*ids.shape, 5), torch.zeros(10, dtype=torch.long), 11)
    with pytest.raises(ValueError, match="seq_len"):
        metrics.perplexity(lambda ids: ids, torch.zeros(10, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="integer"):
        metrics.perplexity(lambda ids: ids, torch.zeros(10), 5)
    with pytest.raises(ValueError, match="1-D"):
        metrics.perplexity(lambda ids: ids, torch.zeros(2, 10, dtype=torch.long), 5)
    with pytest.raises(TypeError, match="logits"):
        metrics.perplexity(lambda ids: (ids,), torch.zeros(10, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="logits of shape"):
        metrics.perplexity(lambda ids: torch.zeros(1, 5, 3), torch.zeros(10, dtype=torch.long), 5)


def test_unigram_perplexity_matches_counting():
    train = datasets.text_tokens("train")
    test = datasets.text_tokens("test")
    counts = collections.Counter(train.tolist())
    total = train.numel() + V
    predicted = [t for w in range(test.numel() // 128) for t in test[w * 128 + 1:(w + 1) * 128].tolist()]
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in predicted) / len(predicted)
    got = metrics.unigram_perplexity(train, test, seq_len=128, vocab_size=V)
    assert got.perplexity == pytest.approx(math.exp(nll), rel=1e-9)
    assert got.predicted_tokens == len(predicted)


# ------------------------------------------------------------------------------------ causal-LM loss

def test_causal_lm_matches_transformers_loss():
    model = _tiny_llama(seed=1).double()
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    expected = model(ids, labels=ids).loss
    assert abs(float(losses.causal_lm(model, ids).detach()) - float(expected.detach())) < 1e-6
    assert abs(float(losses.causal_lm(model, {"input_ids": ids}).detach()) - float(expected.detach())) < 1e-6
    # gradients agree too (pyobc.score differentiates this loss); transformers computes its loss in
    # float32 even for a float64 model, hence the float32-level tolerance
    g_ref = torch.autograd.grad(expected, model.lm_head.weight)[0]
    g = torch.autograd.grad(losses.causal_lm(model, ids), model.lm_head.weight)[0]
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-8)


def test_causal_lm_masks_padding_like_transformers():
    model = _tiny_llama(seed=2).double()
    batch = corpus.ByteTokenizer()(["short", "a longer line of text"], bos=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    expected = model(ids, attention_mask=mask, labels=labels).loss
    assert abs(float(losses.causal_lm(model, batch).detach()) - float(expected.detach())) < 1e-6
    # independently: the mean over the real target tokens of each row, weighted by their number
    nll, n = 0.0, 0
    for row in range(2):
        length = int(mask[row].sum())
        with torch.no_grad():
            z = model(ids[row:row + 1, :length]).logits[0]
        nll += float(F.cross_entropy(z[:-1], ids[row, 1:length], reduction="sum"))
        n += length - 1
    assert abs(float(losses.causal_lm(model, batch).detach()) - nll / n) < 1e-12


def test_causal_lm_errors():
    model = _tiny_llama()
    with pytest.raises(TypeError, match="integer"):
        losses.causal_lm(model, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        losses.causal_lm(model, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        losses.causal_lm(model, {"ids": torch.zeros(2, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="only 0 and 1"):
        losses.causal_lm(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long),
                                 "attention_mask": torch.full((1, 3), 2)})
    with pytest.raises(ValueError, match="no target token"):
        losses.causal_lm(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long),
                                 "attention_mask": torch.tensor([[1, 0, 0]])})
    with pytest.raises(ValueError, match="token ids must be in"):
        losses.causal_lm(lambda ids: torch.zeros(*ids.shape, 4), torch.full((1, 3), 4))


# ---------------------------------------------------------------------------------- the models

def test_tiny_llama_architecture():
    model = models.tiny_llama()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 2)
    assert cfg.vocab_size == V and cfg.max_position_embeddings == 256
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (64, 128) and attn.q_proj.weight.shape == (128, 128)  # GQA: 2 KV heads
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 0.9e6


def test_trained_lm_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOBC_CACHE", str(tmp_path))
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    first = models.trained_lm("tiny-llama", epochs=0, progress=False, num_threads=1)  # untrained: fast
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == threads
    info = first.trained_info
    assert not info.from_cache and not first.training and info.path.startswith(str(tmp_path))
    assert info.heldout_perplexity == pytest.approx(V, rel=0.1)  # random init: close to uniform
    second = models.trained_lm("tiny-llama", epochs=0)
    assert second.trained_info.from_cache and second.trained_info.heldout_perplexity == info.heldout_perplexity
    sa, sb = first.state_dict(), second.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.load(info.path, weights_only=True)["config"] == info.config
    with open(info.path, "wb") as fh:
        fh.write(b"damaged")
    third = models.trained_lm("tiny-llama", epochs=0)
    assert not third.trained_info.from_cache and torch.equal(third.lm_head.weight, first.lm_head.weight)
    with pytest.raises(ValueError, match="unknown language model"):
        models.trained_lm("gpt-5")
    with pytest.raises(ValueError, match="epochs"):
        models.trained_lm(epochs=-1)


def test_trained_tiny_llama_beats_the_unigram_baseline():
    # the real one, from the default cache ($PYOBC_CACHE or ~/.cache/pyobc); trained once (a few minutes)
    model = models.trained_lm("tiny-llama", num_threads=1, progress=False)
    info = model.trained_info
    test = datasets.text_tokens("test")
    measured = metrics.perplexity(model, test, seq_len=info.seq_len, batch_size=32)
    assert measured.perplexity == pytest.approx(info.heldout_perplexity, rel=1e-4)
    counts = collections.Counter(datasets.text_tokens("train").tolist())
    total = sum(counts.values()) + V
    windows = test[: test.numel() // info.seq_len * info.seq_len].reshape(-1, info.seq_len)
    unigram = math.exp(-sum(math.log((counts.get(t, 0) + 1) / total) for t in windows[:, 1:].reshape(-1).tolist())
                       / windows[:, 1:].numel())
    assert info.unigram_perplexity == pytest.approx(unigram, rel=1e-9)
    assert measured.perplexity < 0.5 * unigram, (measured, unigram)
    assert not model.training and info.num_parameters == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        loss = losses.causal_lm(model, next(iter(datasets.text("test", seq_len=info.seq_len, batch_size=4))))
    assert float(loss) < math.log(unigram)


def test_causal_lm_is_the_default_loss_of_causal_language_models():
    model = _tiny_llama()
    ids = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    explicit = pyobc.score(model, [batch], "taylor", loss_fn=causal_lm)
    default = pyobc.score(model, [batch], "taylor")
    for a, b in zip(explicit.values, default.values):
        torch.testing.assert_close(a, b)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=259, n_embd=16, n_layer=1, n_head=2))
    by_hand = pyobc.score(gpt2, [ids], "taylor", loss_fn=lambda m, b: m(b, labels=b).loss)
    for a, b in zip(by_hand.values, pyobc.score(gpt2, [ids], "taylor").values):
        torch.testing.assert_close(a, b)
