"""A tiny Llama language model, and a version of it trained offline on pyobc's text corpus (cached).

``tiny_llama()`` builds a randomly initialised Hugging Face ``LlamaForCausalLM`` small enough to train
on two CPU cores in a few minutes, with the features that make real decoders hard to prune:
grouped-query attention (4 query heads sharing 2 key/value heads), rotary embeddings, RMSNorm and a
gated (SwiGLU) MLP. Its vocabulary is pyobc's byte-level one (:mod:`pyobc.corpus`, 259 ids).
``trained_lm("tiny-llama")`` trains it once on the train split of the corpus (the Python
documentation shipped in the standard library) and caches the weights like :func:`pyobc.models.trained`.

transformers is an optional dependency of pyobc: it is imported on the first call of these functions,
never by ``import pyobc`` or ``import pyobc.models``.

Example:
    >>> from pyobc import models
    >>> model = models.trained_lm("tiny-llama")                  # doctest: +SKIP
    >>> model.trained_info.heldout_perplexity                    # doctest: +SKIP
    3.8...
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .. import corpus, datasets
from .._cache import safe_load, save_model
from .._cache import cache_dir as cache_root
from ..losses import logits, next_token_loss
from ..metrics import perplexity, unigram_perplexity
from .training import train

__all__ = ["LM_VERSION", "LM_RECIPES", "LMTrainedInfo", "lm_names", "tiny_llama", "trained_lm"]

#: Bumped whenever an architecture, the corpus pipeline or a recipe changes; part of every cache file's
#: name and metadata, so stale caches are retrained rather than reused.
LM_VERSION = "pyobc-lm-1"
_FORMAT = 1

#: Architectures (``LlamaConfig`` fields) and training recipes of :func:`trained_lm`'s models.
#: AdamW with a linear warm-up and a cosine decay to ``min_lr_ratio * lr``; batches of ``batch_size``
#: windows of ``seq_len`` tokens of the train split, reshuffled each epoch.
LM_RECIPES: dict[str, dict] = {
    "tiny-llama": dict(
        arch=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
        recipe=dict(epochs=4, batch_size=16, seq_len=128, lr=3e-3, weight_decay=0.1, betas=[0.9, 0.95],
                    warmup=0.05, min_lr_ratio=0.1, max_grad_norm=1.0),
    ),
}


def _transformers():
    """transformers' Llama classes, or an ImportError that says how to get them."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency, imported on use
    except Exception as exc:  # ImportError, or a broken install that fails while importing
        root, depth = exc, 0
        while depth < 20 and (root.__cause__ or root.__context__) is not None:  # the innermost error says why
            root, depth = root.__cause__ or root.__context__, depth + 1
        raise ImportError("pyobc's language models need Hugging Face transformers: pip install transformers "
                          f"(importing it failed: {type(root).__name__}: {root}; a torchvision build that does "
                          "not match torch also breaks `import transformers`)") from exc
    return LlamaConfig, LlamaForCausalLM


def lm_names() -> list[str]:
    """Names :func:`trained_lm` accepts.

    Example:
        >>> from pyobc import models
        >>> models.lm_names()
        ['tiny-llama']
    """
    return sorted(LM_RECIPES)


def tiny_llama(attn_implementation: str = "sdpa", **overrides) -> nn.Module:
    """A randomly initialised (torch's global RNG) tiny ``LlamaForCausalLM`` with pyobc's byte vocabulary.

    Defaults: hidden 128, 4 layers, 4 query heads of 32 dims sharing 2 key/value heads (GQA), SwiGLU
    MLP of 384, untied input/output embeddings, 259 token ids (:data:`pyobc.corpus.VOCAB_SIZE`), 256
    positions; about 0.85 M parameters. ``overrides`` replace any ``LlamaConfig`` field (e.g.
    ``num_hidden_layers=2``). It maps token ids (B, T) to an output whose ``.logits`` is (B, T, 259).
    ``attn_implementation`` is transformers' attention kernel: ``"sdpa"`` (fused, faster) or ``"eager"``
    (plain matmuls and softmax).

    Example:
        >>> import torch
        >>> from pyobc import models
        >>> model = models.tiny_llama(num_hidden_layers=1)
        >>> model(torch.zeros(2, 8, dtype=torch.long)).logits.shape
        torch.Size([2, 8, 259])
    """
    LlamaConfig, LlamaForCausalLM = _transformers()
    fields = dict(LM_RECIPES["tiny-llama"]["arch"], vocab_size=corpus.VOCAB_SIZE, pad_token_id=corpus.PAD,
                  bos_token_id=corpus.BOS, eos_token_id=corpus.EOS)
    fields.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**fields, attn_implementation=attn_implementation))


@dataclasses.dataclass(frozen=True)
class LMTrainedInfo:
    """What :func:`trained_lm` knows about the model it returns (``model.trained_info``)."""

    name: str
    heldout_perplexity: float  #: perplexity on the corpus's test split (windows of ``seq_len``)
    unigram_perplexity: float  #: the train split's unigram distribution on the same tokens (the baseline)
    seq_len: int  #: window length of both perplexities
    num_parameters: int
    config: dict  #: everything the weights depend on (architecture, recipe, seed, corpus digest, version)
    version: str  #: :data:`LM_VERSION`
    train_seconds: float  #: wall time of the training run that produced the weights
    from_cache: bool  #: True when the weights were loaded rather than trained now
    path: str | None  #: the cache file (None if it could not be written)


def _config(name: str, epochs: int | None, seed: int) -> dict:
    spec = copy.deepcopy(LM_RECIPES[name])
    if epochs is not None:
        spec["recipe"]["epochs"] = epochs
    return json.loads(json.dumps({"name": name, **spec, "seed": seed, "corpus": corpus.corpus_digest(),
                                  "vocab_size": corpus.VOCAB_SIZE, "lm_version": LM_VERSION}, sort_keys=True))


def _cache_path(config: dict, cache_dir) -> Path:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    fname = f"{config['name']}_e{config['recipe']['epochs']}_seed{config['seed']}_{digest}.pt"
    return cache_root(cache_dir, "models", LM_VERSION) / fname


def _check_args(name, epochs, seed, num_threads) -> None:
    if name not in LM_RECIPES:
        raise ValueError(f"unknown language model {name!r}; valid names: {', '.join(lm_names())}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0):
        raise ValueError(f"epochs must be None or a non-negative int, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"num_threads must be None or a positive int, got {num_threads!r}")


def trained_lm(
    name: str = "tiny-llama",
    epochs: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    *,
    force: bool = False,
    num_threads: int | None = None,
) -> nn.Module:
    """Language model ``name`` trained on the train split of pyobc's text corpus, in eval mode, on the CPU.

    The first call trains it (recipe in :data:`LM_RECIPES`, fixed ``seed``; torch's global RNG and
    thread count are restored afterwards), measures its held-out perplexity and the unigram baseline,
    and saves the ``state_dict`` and that metadata to ``<cache>/models/<LM_VERSION>/`` (``<cache>``:
    ``cache_dir``, else ``$PYOBC_CACHE``, else ``~/.cache/pyobc``). Later calls load that file with
    ``torch.load(weights_only=True)``; a damaged or incompatible file is retrained and overwritten, and
    ``force=True`` retrains regardless. The cache key includes a digest of the corpus, which changes with
    the Python version that ships it. Training takes about 1.5-3 minutes on two CPU cores.

    Args:
        name: one of :func:`lm_names`.
        epochs: passes over the train split; None for the recipe's.
        seed: seeds initialisation and batch order.
        progress: tqdm bar while training (None: only when stderr is a terminal).
        force: retrain (and overwrite the cache file) even if a valid one exists.
        num_threads: torch intra-op threads to train with (restored afterwards); None keeps the current
            setting. Results can differ in the last bits with the thread count.

    Returns the model with ``model.trained_info`` (an :class:`LMTrainedInfo`).
    """
    _check_args(name, epochs, seed, num_threads)
    config = _config(name, epochs, seed)
    path = _cache_path(config, cache_dir)
    loaded = None if force else _try_load(path, config)
    if loaded is not None:
        model, meta = loaded
    else:
        model, meta = _train_now(config, progress, num_threads)
        path = _save(model, config, meta, path)
    model.eval()
    model.trained_info = LMTrainedInfo(
        name=name, heldout_perplexity=meta["heldout_perplexity"], unigram_perplexity=meta["unigram_perplexity"],
        seq_len=config["recipe"]["seq_len"], num_parameters=sum(p.numel() for p in model.parameters()),
        config=copy.deepcopy(config), version=LM_VERSION, train_seconds=meta["train_seconds"],
        from_cache=loaded is not None, path=None if path is None else str(path),
    )
    return model


def _build(config: dict) -> nn.Module:
    return tiny_llama(**config["arch"])


@contextlib.contextmanager
def _threads(num_threads: int | None):
    before = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _InputsAsTargets:
    """A token-id loader seen as the ``(inputs, targets)`` pairs :func:`pyobc.models.train` reads."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return ((ids, ids) for ids in self.loader)


def _lm_loss(output, ids: torch.Tensor) -> torch.Tensor:
    return next_token_loss(logits(output), ids)


def _train_now(config: dict, progress: bool | None, num_threads: int | None) -> tuple[nn.Module, dict]:
    """Build and train the model ``config`` describes; returns it and its perplexities and training time."""
    recipe, seed = config["recipe"], config["seed"]
    with torch.random.fork_rng(devices=[]), _threads(num_threads):
        torch.manual_seed(seed)
        model = _build(config)
        loader = datasets.text("train", seq_len=recipe["seq_len"], batch_size=recipe["batch_size"], seed=seed,
                               drop_last=True)
        start = time.perf_counter()
        train(model, _InputsAsTargets(loader), epochs=recipe["epochs"], lr=recipe["lr"],
              weight_decay=recipe["weight_decay"], progress=progress, optimizer="adamw",
              betas=tuple(recipe["betas"]), warmup=recipe["warmup"], min_lr_ratio=recipe["min_lr_ratio"],
              loss_fn=_lm_loss, max_grad_norm=recipe["max_grad_norm"])
        seconds = time.perf_counter() - start
        meta = _measure(model, recipe["seq_len"])
    meta["train_seconds"] = float(seconds)
    return model, meta


def _measure(model: nn.Module, seq_len: int) -> dict:
    test = datasets.text_tokens("test")
    ppl = perplexity(model, test, seq_len=seq_len, batch_size=32)
    base = unigram_perplexity(datasets.text_tokens("train"), test, seq_len=seq_len, vocab_size=corpus.VOCAB_SIZE)
    return {"heldout_perplexity": float(ppl), "unigram_perplexity": float(base)}


def _try_load(path: Path, config: dict) -> tuple[nn.Module, dict] | None:
    """The cached model and its metadata, or None when the file is missing, damaged or for another config."""
    blob = safe_load(path)
    if not isinstance(blob, dict):
        return None
    try:
        if blob.get("format") != _FORMAT or blob.get("lm_version") != LM_VERSION or blob.get("config") != config:
            return None
        meta = {k: blob[k] for k in ("heldout_perplexity", "unigram_perplexity", "train_seconds")}
        if not all(isinstance(v, float) for v in meta.values()):
            return None
        model = _build(config)
        model.load_state_dict(blob["state_dict"], strict=True)
    except (KeyError, RuntimeError, TypeError, ValueError):
        return None
    return model, meta


def _save(model: nn.Module, config: dict, meta: dict, path: Path) -> Path | None:
    """Write the weights and metadata to ``path``; returns it, or None (with a warning) when it cannot be
    written: the model is still usable, it is just trained again next time."""
    return save_model(model, {"format": _FORMAT, "lm_version": LM_VERSION, "config": config, **meta}, path,
                      stacklevel=3)
