"""Whole attention heads (grouped-query attention) and transformer MLP neurons of Hugging Face models.

1. Exactness, on a tiny float64 Llama (4 query heads sharing 2 key/value heads, SwiGLU MLP): every
   criterion's head and neuron scores against an independent computation. The weights of each structure
   are written out by hand from the known layout — KV head ``j`` = the q_proj rows of its query heads
   ``PER*j .. PER*j+PER-1``, the k_proj and v_proj rows of head ``j`` and the o_proj columns of its query
   heads; query head ``h`` (``heads="query"``) = its q_proj rows and o_proj columns; MLP neuron ``i`` =
   gate_proj and up_proj row ``i`` and down_proj column ``i`` — gradients come from plain autograd, and
   Hessian- and GGN-vector products from ``torch.func`` on a next-token loss written here.
2. The cut: GQA invariants per layer, read from the pruned weights, and the pruned model's logits equal
   the original model's with the removed heads' and neurons' weights zeroed (rotary stays valid).
3. Round trips of the config: ``save_pretrained``/``from_pretrained`` after a uniform cut,
   ``pyobc.save``/``pyobc.load`` and ``config.pyobc_layer_widths`` after a non-uniform one.
4. GPT-2, BERT, Qwen2, Qwen3, Mistral, Gemma and Phi.
5. Bad input.

Hugging Face's ``LlamaRMSNorm`` computes in float32 whatever the input dtype, which limits any float64
comparison to ~1e-7; the exactness tests swap it for the same formula in the input's dtype
(:class:`_RMSNorm64`), and run attention through PyTorch's math SDPA kernel (the one that supports
forward-mode and double differentiation).
"""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import pyobc
from pyobc.losses import causal_lm

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

LAYERS, Q, KV, D, FF, VOCAB = 2, 4, 2, 4, 24, 32
PER = Q // KV  # query heads per key/value head
CFG = {"hidden_size": 16, "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": Q,
       "num_key_value_heads": KV, "head_dim": D, "vocab_size": VOCAB, "max_position_embeddings": 32,
       "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


class _RMSNorm64(LlamaRMSNorm):
    """LlamaRMSNorm's formula, in the input's dtype (the original upcasts to float32)."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _randomize(model: nn.Module) -> nn.Module:
    """Weights of order one (the default init, std 0.02, makes every score ~1e-9) and non-trivial norms."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "LayerNorm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def llama(exact: bool = False, **overrides) -> nn.Module:
    torch.manual_seed(0)
    model = _randomize(pyobc.models.tiny_llama(**{**CFG, **overrides}))
    if exact:
        for m in model.modules():
            if type(m) is LlamaRMSNorm:
                m.__class__ = _RMSNorm64
    return model


def batches() -> list[torch.Tensor]:
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    return [ids[:2], ids[2:]]


# --------------------------------------------------------------------------------------------------
# the layout, by hand

def _rows(heads) -> list[int]:
    return [h * D + i for h in heads for i in range(D)]


def structures(model: nn.Module, heads: str) -> dict[str, list[dict[str, torch.Tensor]]]:
    """label ("attn0", "mlp1"...) -> per channel: parameter name -> bool mask of the weights it removes."""
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def mask(name, rows=None, cols=None):
        m = torch.zeros(shapes[name], dtype=torch.bool)
        if rows is not None:
            m[rows] = True
        if cols is not None:
            m[:, cols] = True
        return m

    out = {}
    for layer in range(LAYERS):
        a, f = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        if heads == "kv":
            out[f"attn{layer}"] = [{
                a + "q_proj.weight": mask(a + "q_proj.weight", rows=_rows(range(j * PER, j * PER + PER))),
                a + "k_proj.weight": mask(a + "k_proj.weight", rows=_rows([j])),
                a + "v_proj.weight": mask(a + "v_proj.weight", rows=_rows([j])),
                a + "o_proj.weight": mask(a + "o_proj.weight", cols=_rows(range(j * PER, j * PER + PER))),
            } for j in range(KV)]
        else:
            out[f"attn{layer}"] = [{a + "q_proj.weight": mask(a + "q_proj.weight", rows=_rows([h])),
                                    a + "o_proj.weight": mask(a + "o_proj.weight", cols=_rows([h]))}
                                   for h in range(Q)]
        out[f"mlp{layer}"] = [{f + "gate_proj.weight": mask(f + "gate_proj.weight", rows=[i]),
                               f + "up_proj.weight": mask(f + "up_proj.weight", rows=[i]),
                               f + "down_proj.weight": mask(f + "down_proj.weight", cols=[i])} for i in range(FF)]
    return out


def member_sums(structs, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """label -> (channels, members): the sum of the parameter-shaped ``t`` over each member's weights
    (every member here is one weight matrix: Llama's projections have no bias)."""
    return {label: torch.stack([torch.stack([t[p][m].sum() for p, m in ch.items()]) for ch in chans])
            for label, chans in structs.items()}


def labelled(scores: pyobc.Scores) -> dict[str, torch.Tensor]:
    """pyobc's scores by the labels of :func:`structures` (exactly one group per attention and MLP)."""
    out = {}
    for root, v in scores.by_module().items():
        parts = root.split(".")
        label = ("attn" if parts[3] == "self_attn" else "mlp") + parts[2]
        assert label not in out, root
        out[label] = v.double()
    assert set(out) == {f"{k}{i}" for k in ("attn", "mlp") for i in range(LAYERS)}, list(out)
    return out


# --------------------------------------------------------------------------------------------------
# references: autograd and torch.func on a hand-written next-token loss

def next_token(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))


def _logits(model, params, ids):
    with sdpa_kernel(SDPBackend.MATH):
        return functional_call(model, params, (ids,), {"use_cache": False}).logits


def grads(model, ids) -> dict[str, torch.Tensor]:
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    loss = next_token(_logits(model, params, ids), ids)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def hvp(model, ids, v) -> dict[str, torch.Tensor]:
    theta = {n: p.detach() for n, p in model.named_parameters()}
    return jvp(torch.func.grad(lambda p: next_token(_logits(model, p, ids), ids)), (theta,), (v,))[1]


def ggn_vp(model, ids, v) -> dict[str, torch.Tensor]:
    """J^T Lambda J v, Lambda = the Hessian of the mean next-token loss in the logits (closed form)."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    z, jv = jvp(lambda p: _logits(model, p, ids), (theta,), (v,))
    p = z.softmax(-1)
    w = p * jv - p * (p * jv).sum(-1, keepdim=True)
    w[:, -1] = 0  # the last position predicts nothing
    w = w / (ids.shape[0] * (ids.shape[1] - 1))
    return vjp(lambda q: _logits(model, q, ids), theta)[1](w)[0]


@functools.cache
def reference() -> dict:
    """Gradients per batch and per sample, and (H - GGN) v, H theta per batch, of :func:`llama` (exact)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = llama(exact=True)
        theta = {n: p.detach() for n, p in model.named_parameters()}
        norms = {n for n in theta if "norm" in n}
        v_spec = {n: torch.zeros_like(t) if n in norms else t for n, t in theta.items()}  # METHODS.md: v = 0 on norms
        out = {"theta": theta, "batch": [], "sample": [], "inter": [], "full": [], "ggn_by_heads": {}}
        for ids in batches():
            out["batch"].append(grads(model, ids))
            out["sample"] += [grads(model, ids[n:n + 1]) for n in range(ids.shape[0])]
            h, ggn = hvp(model, ids, v_spec), ggn_vp(model, ids, v_spec)
            out["inter"].append({n: theta[n] * (h[n] - ggn[n]) for n in theta})
            full = hvp(model, ids, theta)
            out["full"].append({n: theta[n] * full[n] for n in theta})
        for heads in ("kv", "query"):  # SOSP-H's u = GGN theta_M, theta_M = theta summed over every structure
            count = {n: torch.zeros_like(t) for n, t in theta.items()}
            for chans in structures(model, heads).values():
                for ch in chans:
                    for p, m in ch.items():
                        count[p] += m
            theta_m = {n: theta[n] * count[n] for n in theta}
            out["ggn_by_heads"][heads] = [(theta_m, ggn_vp(model, ids, theta_m)) for ids in batches()]
        return out
    finally:
        torch.set_default_dtype(old)


def _close(got: dict, expected: dict, rtol=1e-8, atol=1e-12):
    assert set(got) == set(expected)
    for k, value in expected.items():
        torch.testing.assert_close(got[k], value, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _score(model, method, heads, **kw):
    return pyobc.score(model, batches(), method, loss_fn=causal_lm, heads=heads, **kw)


# --------------------------------------------------------------------------------------------------
# 1. exactness

HEADS = ["kv", "query"]


@pytest.mark.parametrize("heads", HEADS)
def test_first_order_criteria_and_obd_are_exact(heads):
    """taylor (mean over batches of the squared structure sum of theta*g), jacobian (sum over rows and
    members of <g, w>^2, rows = batches or samples), obd (1/2 theta^2 times the per-sample Fisher)."""
    model, ref = llama(exact=True), reference()
    structs, theta = structures(model, heads), ref["theta"]
    per_batch = [member_sums(structs, {n: theta[n] * g[n] for n in g}) for g in ref["batch"]]
    per_sample = [member_sums(structs, {n: theta[n] * g[n] for n in g}) for g in ref["sample"]]
    fisher = {n: sum(g[n] ** 2 for g in ref["sample"]) / len(ref["sample"]) for n in theta}
    obd = member_sums(structs, {n: 0.5 * theta[n] ** 2 * fisher[n] for n in theta})
    expected = {
        "taylor": {k: sum(b[k].sum(1) ** 2 for b in per_batch) / len(per_batch) for k in structs},
        "jacobian": {k: sum((b[k] ** 2).sum(1) for b in per_batch) for k in structs},
        "jacobian-sample": {k: sum((s[k] ** 2).sum(1) for s in per_sample) for k in structs},
        "obd": {k: obd[k].sum(1) for k in structs},
    }
    got = {"taylor": labelled(_score(model, "taylor", heads)),
           "jacobian": labelled(_score(model, "jacobian", heads)),
           "jacobian-sample": labelled(_score(model, "jacobian", heads, rows="sample")),
           "obd": labelled(_score(model, "obd", heads))}
    for method, value in expected.items():
        _close(got[method], value)


@pytest.mark.parametrize("heads", HEADS)
def test_magnitude_is_exact(heads):
    model = llama(exact=True)
    structs = structures(model, heads)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    for power in (1, 2):
        sums = member_sums(structs, {n: t.abs() ** power for n, t in theta.items()})
        expected = {k: v.sum(1) for k, v in sums.items()}
        got = pyobc.score(model, None, "magnitude", example_inputs=batches()[0], heads=heads, p=power)
        _close(labelled(got), expected)


def _oba_expected(structs, per_batch_s):
    """Reference aggregation: per member |mean over batches of the member sum of S|; summed over members
    (group_reduction="sum", normalize="none"), and the default (mean over non-zero members / group max)."""
    sums = [member_sums(structs, s) for s in per_batch_s]
    members = {k: (sum(s[k] for s in sums) / len(sums)).abs() for k in structs}
    raw = {k: m.sum(1) for k, m in members.items()}
    mean = {k: m.sum(1) / (m != 0).sum(1).clamp_min(1) for k, m in members.items()}
    return raw, {k: v / v.max() for k, v in mean.items()}


def _check_oba(heads, hessian):
    model, ref = llama(exact=True), reference()
    structs = structures(model, heads)
    key = "full" if hessian == "full" else "inter"
    raw, default = _oba_expected(structs, ref[key])
    _close(labelled(_score(model, "oba", heads, hessian=hessian, group_reduction="sum", normalize="none")), raw)
    _close(labelled(_score(model, "oba", heads, hessian=hessian)), default)
    per_weight = _score(model, "oba", heads, hessian=hessian, granularity="weight").by_parameter()
    _close({k: v.double() for k, v in per_weight.items()},
           {n: sum(s[n] for s in ref[key]) / len(ref[key]) for n in ref["theta"]})


@pytest.mark.parametrize("heads", HEADS)
def test_oba_full_hessian_is_exact(heads):
    """hessian="full": S = theta * H theta over every parameter."""
    _check_oba(heads, "full")


@pytest.mark.parametrize("heads", HEADS)
def test_oba_inter_layer_is_exact(heads):
    """Default: S = theta * (H - GGN) v with v = theta off the norm parameters and 0 on them."""
    _check_oba(heads, "inter-layer")


@pytest.mark.parametrize("heads", HEADS)
def test_sosp_h_is_exact(heads):
    """lambda_s = |mean_b theta_s.g_b| + 1/2 |mean_b theta_s.GGN_b theta_M|."""
    model, ref = llama(exact=True), reference()
    structs = structures(model, heads)
    first = [member_sums(structs, {n: ref["theta"][n] * g[n] for n in g}) for g in ref["batch"]]
    second = [member_sums(structs, {n: ref["theta"][n] * u[n] for n in u}) for _, u in ref["ggn_by_heads"][heads]]
    mean = (lambda terms, k: sum(t[k].sum(1) for t in terms) / len(terms))
    expected = {k: mean(first, k).abs() + 0.5 * mean(second, k).abs() for k in structs}
    _close(labelled(_score(model, "sosp-h", heads)), expected)


@pytest.mark.parametrize("heads", HEADS)
def test_oracle_is_the_loss_change_of_zeroing_the_structure(heads):
    model = llama(exact=True)
    structs = structures(model, heads)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    data = batches()

    def loss(params):  # mean over samples: every batch has as many tokens per sample
        with torch.no_grad():
            return sum(next_token(_logits(model, params, ids), ids) * len(ids) for ids in data) / sum(map(len, data))

    base = loss(theta)
    expected = {k: torch.stack([loss({n: t.masked_fill(ch[n], 0) if n in ch else t for n, t in theta.items()}) - base
                                for ch in chans]) for k, chans in structs.items()}
    _close(labelled(_score(model, "oracle", heads)), expected, rtol=1e-7, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# the cut, read back from the pruned weights

def _parts(model: nn.Module, family: str, layer: int) -> dict[str, tuple[list[torch.Tensor], int]]:
    """Views of one layer's weights with the unit on axis 0: "q" (query heads), "kv" (key/value heads),
    "o" (output projection, by query head), "ff_in"/"ff_out" (MLP neurons), each with its unit width."""
    if family == "separate":
        blk = model.model.layers[layer]
        a, m = blk.self_attn, blk.mlp
        bias = (lambda lin: [lin.bias] if lin.bias is not None else [])
        o = getattr(a, "o_proj", None) or a.dense  # Phi: dense, and an fc1/fc2 MLP with biases
        ff_in, ff_out = ([m.gate_proj, m.up_proj], m.down_proj) if hasattr(m, "gate_proj") else ([m.fc1], m.fc2)
        return {"q": ([a.q_proj.weight] + bias(a.q_proj), D), "o": ([o.weight.t()], D),
                "kv": ([a.k_proj.weight, a.v_proj.weight] + bias(a.k_proj) + bias(a.v_proj), D),
                "ff_in": ([lin.weight for lin in ff_in] + [b for lin in ff_in for b in bias(lin)], 1),
                "ff_out": ([ff_out.weight.t()], 1)}
    if family == "gpt2":  # Conv1D weights are (in, out): [q | k | v] columns of c_attn
        blk = model.transformer.h[layer]
        w, b, width = blk.attn.c_attn.weight.t(), blk.attn.c_attn.bias, blk.attn.c_proj.weight.shape[0]
        return {"q": ([w[:width], b[:width]], D), "o": ([blk.attn.c_proj.weight], D),
                "kv": ([w[width:2 * width], w[2 * width:], b[width:2 * width], b[2 * width:]], D),
                "ff_in": ([blk.mlp.c_fc.weight.t(), blk.mlp.c_fc.bias], 1), "ff_out": ([blk.mlp.c_proj.weight], 1)}
    blk = model.bert.encoder.layer[layer]  # bert
    s = blk.attention.self
    return {"q": ([s.query.weight, s.query.bias], D), "o": ([blk.attention.output.dense.weight.t()], D),
            "kv": ([s.key.weight, s.value.weight, s.key.bias, s.value.bias], D),
            "ff_in": ([blk.intermediate.dense.weight, blk.intermediate.dense.bias], 1),
            "ff_out": ([blk.output.dense.weight.t()], 1)}


def _kept(orig: list[torch.Tensor], new: list[torch.Tensor], width: int) -> list[int]:
    """The original units (blocks of ``width`` along axis 0) that the pruned tensors hold, in order; every
    tensor of the list must hold exactly those."""
    blocks = orig[0].detach().split(width)
    kept = []
    for b in new[0].detach().split(width):
        hits = [i for i, o in enumerate(blocks) if torch.equal(o, b)]
        assert len(hits) == 1, "a pruned unit is not a unit of the original"
        kept.append(hits[0])
    rows = [u * width + r for u in kept for r in range(width)]
    for o, n in zip(orig, new):
        assert torch.equal(n.detach(), o.detach()[rows])
    return kept


def kept_units(original: nn.Module, pruned: nn.Module, family: str) -> list[dict[str, list[int]]]:
    """Per layer: the kept query heads, key/value heads and MLP neurons (original indices)."""
    out = []
    for layer in range(LAYERS):
        a, b = _parts(original, family, layer), _parts(pruned, family, layer)
        units = {k: _kept(a[k][0], b[k][0], a[k][1]) for k in ("q", "kv", "ff_in")}
        assert _kept(a["o"][0], b["o"][0], D) == units["q"]
        assert _kept(a["ff_out"][0], b["ff_out"][0], 1) == units["ff_in"]
        out.append(units)
    return out


def zeroed(original: nn.Module, kept: list[dict[str, list[int]]], family: str) -> nn.Module:
    """A copy of ``original`` with every weight of the units the cut removed set to zero."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for layer, units in enumerate(kept):
            parts = _parts(ref, family, layer)
            for key, unit in (("q", "q"), ("o", "q"), ("kv", "kv"), ("ff_in", "ff_in"), ("ff_out", "ff_in")):
                tensors, width = parts[key]
                gone = [u for u in range(tensors[0].shape[0] // width) if u not in units[unit]]
                for t in tensors:
                    for u in gone:
                        t[u * width:(u + 1) * width] = 0
    return ref


def _logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _assert_cut_is_exact(original, pruned, family, ids):
    """The pruned model computes what the original computes with the removed units zeroed."""
    kept = kept_units(original, pruned, family)
    torch.testing.assert_close(_logits_of(pruned, ids), _logits_of(zeroed(original, kept, family), ids),
                               rtol=1e-10, atol=1e-10)
    return kept


def _prune(model, heads, ratio=0.5, scope="local", method="jacobian", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = _score(model, method, heads)
        return pyobc.prune(model, scores, ratio, scope=scope, target="channels", **kw)[0]


# --------------------------------------------------------------------------------------------------
# 2. GQA invariants

@pytest.mark.parametrize("scope", ["local", "global"])
def test_kv_heads_leave_with_all_their_query_heads(scope):
    model = llama(exact=True)
    pruned = _prune(model, "kv", 0.5 if scope == "local" else 0.7, scope=scope)  # 0.7: non-uniform heads
    kept = _assert_cut_is_exact(model, pruned, "separate", batches()[0])
    assert any(len(u["kv"]) < KV for u in kept), "the premise: some key/value head is removed"
    assert scope == "local" or len({len(u["kv"]) for u in kept}) > 1, "the premise: a non-uniform cut"
    for layer, units in zip(pruned.model.layers, kept):
        assert units["q"] == [h for j in units["kv"] for h in range(j * PER, j * PER + PER)]
        attn = layer.self_attn
        assert (attn.num_key_value_groups, attn.head_dim) == (PER, D)
        assert attn.q_proj.out_features == len(units["q"]) * D and attn.k_proj.out_features == len(units["kv"]) * D
        if scope == "local":
            assert len(units["kv"]) == KV // 2 and len(units["ff_in"]) == FF // 2
    assert pruned.config.head_dim == D


@pytest.mark.parametrize("scope", ["local", "global"])
def test_query_heads_leave_every_kv_group_equally(scope):
    model = llama(exact=True)
    pruned = _prune(model, "query", 0.5 if scope == "local" else 0.7, scope=scope)
    kept = _assert_cut_is_exact(model, pruned, "separate", batches()[0])
    assert any(len(u["q"]) < Q for u in kept), "the premise: some query head is removed"
    assert scope == "local" or len({len(u["q"]) for u in kept}) > 1, "the premise: a non-uniform cut"
    for layer, units in zip(pruned.model.layers, kept):
        assert units["kv"] == list(range(KV))  # key/value heads stay
        per_group = [sum(h // PER == j for h in units["q"]) for j in range(KV)]
        assert len(set(per_group)) == 1 and per_group[0] >= 1, per_group
        attn = layer.self_attn
        assert (attn.num_key_value_groups, attn.head_dim) == (per_group[0], D)
        if scope == "local":
            assert per_group == [PER // 2] * KV



def test_query_heads_go_per_kv_group_even_when_the_lowest_share_one():
    """Scores 1 < 2 < 3 < 4 on query heads 0..3: the two lowest share key/value head 0, yet each group
    loses its own lowest (heads 0 and 2)."""
    model = llama(exact=True)
    scores = _score(model, "jacobian", "query")
    for i, g in enumerate(scores.groups):
        if "self_attn" in g.root:
            scores.values[i] = torch.arange(1.0, Q + 1, dtype=torch.float64)
    pruned, _ = pyobc.prune(model, scores, 0.5, scope="local")
    for units in _assert_cut_is_exact(model, pruned, "separate", batches()[0]):
        assert units["q"] == [1, 3] and units["kv"] == [0, 1]

# --------------------------------------------------------------------------------------------------
# 3. round trips of the config

def _config_agrees(model: nn.Module) -> dict[str, list[int]]:
    """The config says what the modules are: a number where every layer agrees, else the per-layer list
    in ``config.pyobc_layer_widths`` (and only then). Returns the per-layer values."""
    cfg, layers = model.config, model.model.layers
    values = {"num_attention_heads": [b.self_attn.q_proj.out_features // D for b in layers],
              "num_key_value_heads": [b.self_attn.k_proj.out_features // D for b in layers],
              "intermediate_size": [b.mlp.down_proj.in_features for b in layers]}
    widths = getattr(cfg, "pyobc_layer_widths", None) or {}
    for field, per_layer in values.items():
        if len(set(per_layer)) == 1:
            assert getattr(cfg, field) == per_layer[0] and field not in widths, field
        else:
            assert widths[field] == per_layer, field
    assert set(widths) <= set(values)
    assert cfg.head_dim == D
    for b, q, kv, ff in zip(layers, *values.values()):
        assert (b.self_attn.head_dim, b.self_attn.num_key_value_groups, b.mlp.intermediate_size) == (D, q // kv, ff)
    return values


@pytest.mark.parametrize("heads", HEADS)
def test_uniform_cut_round_trips_through_save_pretrained(heads, tmp_path):
    model = llama()  # Hugging Face's own classes: from_pretrained rebuilds them
    pruned = _prune(model, heads)
    values = _config_agrees(pruned)
    assert values["num_key_value_heads"] == ([KV // 2] if heads == "kv" else [KV]) * LAYERS
    assert values["num_attention_heads"] == [Q // 2] * LAYERS
    ids = batches()[0]
    logits = _logits_of(pruned, ids)
    generated = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 5)
    pruned.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert _config_agrees(again) == values
    torch.testing.assert_close(_logits_of(again, ids), logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(again.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False),
                       generated)


def test_non_uniform_cut_round_trips_through_pyobc_save(tmp_path):
    model = llama()
    pruned = _prune(model, "kv", 0.7, scope="global")
    values = _config_agrees(pruned)
    assert pruned.config.pyobc_layer_widths == {k: v for k, v in values.items() if len(set(v)) > 1}
    assert set(pruned.config.pyobc_layer_widths) == set(values), "the premise: every width differs between layers"
    ids = batches()[0]
    pyobc.save(pruned, tmp_path / "pruned.pt")
    again = pyobc.load(pyobc.models.tiny_llama(**CFG), tmp_path / "pruned.pt").eval()
    torch.testing.assert_close(_logits_of(again, ids), _logits_of(pruned, ids), rtol=1e-10, atol=1e-10)
    assert _config_agrees(again) == values
    assert again.config.pyobc_layer_widths == pruned.config.pyobc_layer_widths


# --------------------------------------------------------------------------------------------------
# 4. other architectures

_TEXT = {k: CFG[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "intermediate_size", "max_position_embeddings", "pad_token_id", "bos_token_id",
                             "eos_token_id")}
#: name -> (constructor, head family, tolerance of the zeroed-units check: the Llama-family RMSNorms compute
#: in float32 whatever the input dtype)
ARCHS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=LAYERS, n_head=Q, n_inner=FF, n_positions=32, bos_token_id=1,
        eos_token_id=2)), "gpt2", 1e-10),
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(**_TEXT)), "bert", 1e-10),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TEXT, num_key_value_heads=KV)),
              "separate", 1e-5),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_TEXT, num_key_value_heads=KV,
                                                                           head_dim=D)), "separate", 1e-5),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_TEXT, num_key_value_heads=KV,
                                                                                 head_dim=D)), "separate", 1e-5),
    "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**_TEXT, num_key_value_heads=KV,
                                                                           head_dim=D)), "separate", 1e-5),
    # Phi: the output projection is ``dense``, attention and MLP run in parallel off one LayerNorm
    "phi": (lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**_TEXT, num_key_value_heads=KV)),
            "separate", 1e-10),
}


def _widths(model: nn.Module, family: str) -> tuple[list, dict]:
    """Per layer (query heads, key/value heads, head attribute(s), MLP width) from the modules, and the config's."""
    cfg = model.config
    if family == "separate":
        mods = [(b.self_attn.q_proj.out_features // D, b.self_attn.k_proj.out_features // D,
                 b.self_attn.num_key_value_groups, (getattr(b.mlp, "down_proj", None) or b.mlp.fc2).in_features)
                for b in model.model.layers]
        return mods, {"q": cfg.num_attention_heads, "kv": cfg.num_key_value_heads, "ff": cfg.intermediate_size}
    if family == "gpt2":
        mods = [(b.attn.c_proj.weight.shape[0] // D, b.attn.num_heads, b.attn.split_size // D,
                 b.mlp.c_fc.weight.shape[1]) for b in model.transformer.h]
        return mods, {"q": cfg.n_head, "kv": cfg.num_attention_heads, "ff": cfg.n_inner}
    mods = [(b.attention.self.query.out_features // D, b.attention.self.num_attention_heads,
             b.attention.self.all_head_size // D, b.intermediate.dense.out_features) for b in model.bert.encoder.layer]
    return mods, {"q": cfg.num_attention_heads, "kv": cfg.num_attention_heads, "ff": cfg.intermediate_size}


@pytest.mark.parametrize("name,heads",
                         [(a, "kv") for a in ARCHS] + [(a, "query") for a in ("qwen2", "qwen3", "mistral", "gemma", "phi")])
def test_other_architectures_lose_whole_heads(name, heads):
    make, family, tol = ARCHS[name]
    torch.manual_seed(0)
    model = _randomize(make())
    pruned = _prune(model, heads)
    ids = batches()[0]
    kept = kept_units(model, pruned, family)
    torch.testing.assert_close(_logits_of(pruned, ids), _logits_of(zeroed(model, kept, family), ids),
                               rtol=tol, atol=tol)
    mods, cfg = _widths(pruned, family)
    gqa = family == "separate"
    q, kv = (Q // 2, KV // 2) if heads == "kv" else (Q // 2, KV)
    if not gqa:
        kv = q
    for layer, units in zip(mods, kept):
        assert len(units["q"]) == q and len(units["kv"]) == kv and len(units["ff_in"]) == FF // 2
        assert layer == ((q, kv, q // kv, FF // 2) if gqa else (q, q, q, FF // 2))
    assert cfg == {"q": q, "kv": kv, "ff": FF // 2}


# --------------------------------------------------------------------------------------------------
# 5. bad input

@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_models_whose_every_attention_loses_whole_heads_score_without_a_warning(name):
    """Their hidden width stays by design (every attention module is cut by heads): nothing to warn about."""
    model = llama() if name == "llama" else _randomize(ARCHS[name][0]())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _score(model, "jacobian", "kv")
    assert not [str(w.message) for w in caught if str(w.message).startswith("pyobc")]

def test_unknown_heads_value_names_the_choices():
    model = llama()
    with pytest.raises(ValueError, match=r"'kv'.*'query'"):
        _score(model, "jacobian", "both")
    with pytest.raises(ValueError, match=r"'kv'.*'query'"):
        pyobc.build_groups(model, batches()[0], heads="key")


class SinkAttention(nn.Module):
    """Llama-like attention with a learned logit per head of its own (an attention sink): a per-head
    nn.Parameter that a head cut would have to follow, so pyobc must leave the heads alone."""

    def __init__(self, dim=16, heads=Q, kv=KV):
        super().__init__()
        self.head_dim, self.num_key_value_groups = D, heads // kv
        self.q_proj, self.o_proj = nn.Linear(dim, heads * D, bias=False), nn.Linear(heads * D, dim, bias=False)
        self.k_proj, self.v_proj = nn.Linear(dim, kv * D, bias=False), nn.Linear(dim, kv * D, bias=False)
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, D).transpose(1, 2)
        k, v = (p(x).view(b, t, -1, D).transpose(1, 2).repeat_interleave(self.num_key_value_groups, 1)
                for p in (self.k_proj, self.v_proj))
        a = q @ k.transpose(-1, -2) / D ** 0.5 + self.sinks.view(1, -1, 1, 1)
        return self.o_proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


class SinkModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(VOCAB, 16), SinkAttention(), nn.Linear(16, VOCAB)
        self.fc1, self.fc2 = nn.Linear(16, FF), nn.Linear(FF, 16)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h)
        return self.head(h + self.fc2(F.relu(self.fc1(h))))


def test_attention_with_per_head_parameters_is_left_whole_with_a_warning():
    torch.manual_seed(0)
    model = SinkModel().eval()
    ids = batches()[0]
    with pytest.warns(UserWarning, match="left whole.*: attn"):
        scores = pyobc.score(model, [ids], "jacobian", loss_fn=causal_lm)
    assert [(m.module, m.kind) for g in scores.groups for m in g.members] == [("fc1", "out"), ("fc2", "in")]
    pruned, _ = pyobc.prune(model, scores, 0.5, scope="local")
    shapes = {n: p.shape for n, p in model.attn.named_parameters()}
    assert {n: p.shape for n, p in pruned.attn.named_parameters()} == shapes
    assert pruned.fc1.out_features == FF // 2  # the MLP is still pruned
    assert pruned(ids).shape == (2, 6, VOCAB)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("max_layer_ratio", [0.95, 1.0])
def test_an_excessive_ratio_keeps_a_head_per_kv_group(heads, max_layer_ratio):
    model = llama(exact=True)
    pruned = _prune(model, heads, 0.99, max_layer_ratio=max_layer_ratio)
    kept = _assert_cut_is_exact(model, pruned, "separate", batches()[0])
    for units in kept:
        assert len(units["kv"]) >= 1 and len(units["ff_in"]) >= 1
        per_group = [sum(h // PER == j for h in units["q"]) for j in units["kv"]]
        assert min(per_group) >= 1 and len(set(per_group)) == 1, per_group
    _config_agrees(pruned)
