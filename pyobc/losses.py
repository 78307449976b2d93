"""Loss functions with the ``loss_fn(model, batch) -> scalar`` signature that :func:`pyobc.score` takes.

``causal_lm`` is the next-token cross-entropy of a causal language model on batches of token ids
(as :func:`pyobc.datasets.text` yields them, or tokenizer dicts). ``logits`` reads the logits out of
whatever a model returns (a tensor, a Hugging Face ``ModelOutput``, a dict); :mod:`pyobc.metrics` uses it
too.

Example:
    >>> import torch
    >>> from pyobc.losses import causal_lm
    >>> model = torch.nn.Embedding(8, 8)           # logits (B, T, 8) from token ids (B, T)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> loss = causal_lm(model, ids)                  # a scalar with a graph: loss.backward() works
    >>> torch.allclose(loss, torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]))
    True
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["logits", "lm_inputs", "causal_lm", "next_token_loss"]

_IGNORE = -100


def logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, its ``.logits`` (Hugging Face outputs) or its
    ``"logits"`` entry (a dict). Anything else is a TypeError (a tuple is ambiguous: is the loss first?).

    Example:
        >>> import torch
        >>> from pyobc.losses import logits
        >>> logits({"logits": torch.zeros(1, 2, 3)}).shape
        torch.Size([1, 2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, "logits", None)
    if value is None and isinstance(output, Mapping):
        value = output.get("logits")
    if not isinstance(value, torch.Tensor):
        raise TypeError("the model must return logits: a tensor, an object with a .logits tensor (Hugging "
                        f"Face outputs) or a dict with a 'logits' tensor; got {type(output).__name__}")
    return value


def lm_inputs(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask)`` of a language-model batch: an integer tensor (B, T) (mask None)
    or a mapping with ``"input_ids"`` and optionally ``"attention_mask"`` (same shape, 0/1).

    Example:
        >>> import torch
        >>> from pyobc.losses import lm_inputs
        >>> ids, mask = lm_inputs(torch.zeros(2, 5, dtype=torch.long))
        >>> tuple(ids.shape), mask
        ((2, 5), None)
    """
    mask = None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a dict batch needs an 'input_ids' entry; it has {sorted(batch)}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")  # a missing or None mask: no padding
    else:
        ids = batch
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dim() != 2:
        raise TypeError("input_ids must be an integer tensor of shape (batch, time); got "
                        + (f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                           else type(ids).__name__))
    if ids.shape[1] < 2:
        raise ValueError(f"a causal-LM batch needs at least 2 tokens per row, got shape {tuple(ids.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise ValueError(f"attention_mask must be a tensor of the same shape as input_ids {tuple(ids.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
    return ids, mask


def causal_lm(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a causal LM over a batch of token ids.

    ``batch`` is a LongTensor (B, T) or a dict ``{"input_ids", "attention_mask"}``. The model is called as
    ``model(input_ids)`` (or ``model(input_ids, attention_mask=mask)`` when the batch has a mask) and must
    return logits (B, T, V) in any form :func:`logits` reads. Position t predicts token t + 1; targets whose
    attention mask is 0 (padding) are left out, and the mean is over all remaining predicted tokens of the
    batch, the same convention as Hugging Face's ``model(input_ids, labels=...)`` loss with padded labels
    set to -100. Without padding that is also the mean over the batch's samples, which is what
    :func:`pyobc.score`'s per-sample criteria assume. Logits in half precision are upcast to float32.

    Example:
        >>> import torch
        >>> from pyobc.losses import causal_lm
        >>> uniform = lambda ids: torch.zeros(*ids.shape, 16)          # every token equally likely
        >>> round(float(causal_lm(uniform, torch.randint(0, 16, (2, 6)))), 6) == round(float(torch.log(torch.tensor(16.))), 6)
        True
    """
    ids, mask = lm_inputs(batch)
    out = model(ids) if mask is None else model(ids, attention_mask=mask)
    return next_token_loss(logits(out), ids, mask)


def next_token_loss(z: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of :func:`causal_lm` from logits ``z`` (B, T, V) already computed for ``input_ids`` (B, T).

    Example:
        >>> import torch
        >>> from pyobc.losses import next_token_loss
        >>> ids = torch.tensor([[0, 1, 1]])
        >>> z = torch.tensor([[[0.0, 9.0], [0.0, 9.0], [9.0, 0.0]]])   # confident and right on both targets
        >>> bool(next_token_loss(z, ids) < 1e-3)
        True
    """
    ids, mask = lm_inputs({"input_ids": input_ids, "attention_mask": attention_mask})
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[:2] != ids.shape:
        raise ValueError(f"expected logits of shape (batch, time, vocab) = {tuple(ids.shape)} + (V,), got "
                         + (f"{tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__))
    if int(ids.max()) >= z.shape[-1] or int(ids.min()) < 0:
        raise ValueError(f"token ids must be in [0, {z.shape[-1]}) (the logits' vocabulary), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    targets = ids[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, _IGNORE)
        if not bool((targets != _IGNORE).any()):
            raise ValueError("the batch has no target token: every position after the first is padding")
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), targets.reshape(-1), ignore_index=_IGNORE)
