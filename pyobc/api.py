"""The public scoring entry point, :func:`score`: a method name to a criterion, run by the engine.

It sits above both :mod:`pyobc.criteria` (which it looks the name up in) and :mod:`pyobc.scoring` (which
runs the criterion), so that neither of those has to import the other: the layers point one way,
ops -> scoring -> criteria -> api -> pruning -> cli.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .blockwise import score_blockwise
from .criteria import get_method
from .distributed import Coordinator
from .scoring import engine
from .scoring.context import LossFn
from .scoring.scores import Scores

__all__ = ["score"]


def score(
    model: nn.Module,
    loader: Iterable | None,
    method: str = "jacobian",
    *,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    granularity: str = "channel",
    progress: bool | None = None,
    ignored_layers: Sequence[nn.Module | str] = (),
    heads: str = "kv",
    hidden: bool = False,
    blockwise: bool = False,
    distributed: Any = None,
    **options: Any,
) -> Scores:
    """Score every prunable channel group of ``model`` with a criterion; higher = more important.

    Args:
        model: any ``nn.Module`` (DDP / ``torch.compile`` wrappers are looked through). It is not
            changed: its train/eval flags, parameters and ``.grad`` are the same afterwards. Scoring runs
            it in eval mode (BatchNorm uses its running statistics, dropout is off). While a batch is
            scored, Python's automatic garbage collection is paused (young generations are collected
            after each batch; see :mod:`pyobc.scoring.collector`) and restored afterwards.
        loader: iterable of batches; ``(inputs, targets)`` pairs unless ``loss_fn`` is given. Data-free
            criteria (``magnitude``) accept ``None`` with ``example_inputs``.
        method: a name from :func:`pyobc.methods` (``jacobian`` by default).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for other batch shapes; it must be the *mean* over
            the batch's samples (per-sample criteria rely on it). Default: cross-entropy on ``(inputs,
            targets)``, or :func:`pyobc.losses.causal_lm` (labels = the inputs, shifted; batches of token
            ids or ``{"input_ids", "attention_mask"}`` dicts) for Hugging Face ``*ForCausalLM`` models.
        example_inputs: inputs for tracing the coupled layers; default: the first batch's inputs.
        max_batches: stop after this many batches.
        device: score on this device: batches are moved there, and if the model lives elsewhere a copy
            of it is moved there (the original is untouched). Default: the model's device, with an
            error if a batch lives elsewhere.
        granularity: ``"channel"`` (groups) or ``"weight"`` (per-parameter scores, for the criteria that
            define them; see :meth:`Scores.by_parameter`).
        progress: tqdm progress bar over batches; default on only when stderr is a terminal.
        ignored_layers: modules (or names) whose out-channels must not be pruned.
        heads: what one channel of an attention module is, for the attention layouts pyobc knows (timm,
            Hugging Face Llama/Mistral/Qwen, BERT, GPT-2): ``"kv"`` (default) a key/value head with the
            query heads that share it (an attention head without grouped-query attention); ``"query"``
            one query head, the same number cut from every key/value group.
        hidden: also score the hidden (residual) width of a Llama-family decoder as one group
            (:mod:`pyobc.hidden_width`): the embedding, every norm and projection over it, the LM head.
        blockwise: score a transformer's layers one at a time (:mod:`pyobc.blockwise`): peak memory of
            one layer's pass plus the recorded hidden states, for models whose whole second-order pass does
            not fit. Exact for magnitude, taylor, jacobian and obd; ``oba`` keeps the curvature inside each
            layer. Scores only the decoder layers' heads and MLP neurons.
        distributed: data-parallel scoring (see ``docs/distributed.md``). ``None`` (default): when
            ``torch.distributed`` is initialised with more than one process, each rank scores its own
            loader (its shard, e.g. :func:`pyobc.distributed.sharded_loader`) and the accumulators are
            summed across ranks, so every rank returns the same scores; any error or mismatched
            configuration on one rank raises on every rank. ``False``: score this rank's loader alone,
            with no communication. ``True``: like ``None`` but require an initialised process group. A
            ``ProcessGroup``: combine over that group.
        **options: criterion options (see ``pyobc.methods()[name]``).

    Example:
        >>> import pyobc
        >>> model = pyobc.models.resnet20(num_classes=10, in_channels=1, input_size=16)
        >>> loader = pyobc.datasets.digits("train", batch_size=64, image_size=16, channels=1)
        >>> scores = pyobc.score(model, loader, "jacobian", max_batches=2)   # doctest: +SKIP
        >>> scores.by_module()["conv1"].shape                                   # doctest: +SKIP
        torch.Size([16])
    """
    if blockwise:
        if hidden:
            raise ValueError("blockwise=True scores the decoder layers' heads and MLP neurons; the hidden width "
                             "spans every layer (use hidden=True without blockwise)")
        if distributed not in (None, False) or device is not None or example_inputs is not None or ignored_layers:
            raise ValueError("blockwise=True does not take distributed, device, example_inputs or ignored_layers")
        return score_blockwise(get_method(method), model, loader, loss_fn=loss_fn, max_batches=max_batches,
                               progress=progress, heads=heads, granularity=granularity, options=options)
    coordinator = Coordinator(distributed)
    try:
        return engine.run(get_method(method), model, loader, coordinator=coordinator, loss_fn=loss_fn,
                          example_inputs=example_inputs, max_batches=max_batches, device=device,
                          granularity=granularity, progress=progress, ignored_layers=ignored_layers, heads=heads, hidden=hidden,
                          options=options)
    except Exception as exc:
        coordinator.fail(exc)  # data-parallel: the other ranks raise too instead of waiting in a collective
        raise
