"""Evaluation of language models: perplexity over a token stream, and the unigram baseline.

(``pyobc.eval`` names the same functions; they are implemented here, in a module whose name does not hide
the built-in ``eval`` when imported with ``from pyobc import ...``.)

Protocol of :func:`perplexity`: the 1-D token stream is cut into non-overlapping windows of ``seq_len``
tokens (a shorter remainder at the end is dropped); each window is one model input, and every position
but the first is predicted from the ones before it in the same window. The perplexity is exp of the
mean negative log-likelihood (natural log) over all predicted tokens of all windows. It depends on
``seq_len`` (longer windows give more context), so the result carries ``seq_len`` and prints it.

Example:
    >>> import torch
    >>> from pyobc.metrics import perplexity
    >>> uniform = lambda ids: torch.zeros(*ids.shape, 50)     # every next token equally likely
    >>> perplexity(uniform, torch.randint(0, 50, (1000,)), seq_len=100)
    Perplexity(50, seq_len=100, windows=10, predicted_tokens=990)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .losses import logits
from .model_state import preserved_state

__all__ = ["Perplexity", "perplexity", "unigram_perplexity"]


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """A perplexity and how it was measured; ``float(p)`` is the perplexity.

    Example:
        >>> from pyobc.metrics import Perplexity
        >>> p = Perplexity(perplexity=7.389, nll=2.0, seq_len=128, windows=3, predicted_tokens=381)
        >>> print(p)
        perplexity 7.39 (seq_len 128, 381 predicted tokens in 3 windows)
        >>> float(p)
        7.389
    """

    perplexity: float  #: exp(nll)
    nll: float  #: mean negative log-likelihood per predicted token, in nats
    seq_len: int  #: window length (tokens per model input)
    windows: int  #: number of windows evaluated
    predicted_tokens: int  #: number of tokens whose likelihood was measured

    def __float__(self) -> float:
        return float(self.perplexity)

    def __repr__(self) -> str:
        return (f"Perplexity({self.perplexity:.6g}, seq_len={self.seq_len}, windows={self.windows}, "
                f"predicted_tokens={self.predicted_tokens})")

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.2f} (seq_len {self.seq_len}, {self.predicted_tokens} predicted "
                f"tokens in {self.windows} windows)")


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The stream as (n, seq_len) non-overlapping windows, the remainder dropped; checks the arguments."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise TypeError(f"tokens must be an integer tensor (a token stream), got {type(tokens).__name__}"
                        + (f" of dtype {tokens.dtype}" if isinstance(tokens, torch.Tensor) else ""))
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream (or (1, N)), got shape {tuple(tokens.shape)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"the stream has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len).long()


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return None


def _result(nll_sum: float, count: int, seq_len: int, windows: int) -> Perplexity:
    nll = nll_sum / count
    return Perplexity(perplexity=math.exp(nll), nll=nll, seq_len=seq_len, windows=windows, predicted_tokens=count)


@torch.no_grad()
def perplexity(model: nn.Module | Callable, tokens: torch.Tensor, seq_len: int, batch_size: int = 8) -> Perplexity:
    """Perplexity of a causal LM on a token stream (see the module docstring for the protocol).

    Args:
        model: maps token ids (B, seq_len) to logits (B, seq_len, V), returned as a tensor, a Hugging
            Face output with ``.logits`` or a dict with ``"logits"``. An ``nn.Module`` runs in eval mode
            and gets its own train/eval flags back afterwards; windows go to its device.
        tokens: the 1-D int token stream (e.g. :func:`pyobc.datasets.text_tokens`).
        seq_len: window length; ``tokens.numel() // seq_len`` windows are evaluated.
        batch_size: windows per forward pass (does not change the result beyond rounding).

    Example:
        >>> import torch
        >>> from pyobc.metrics import perplexity
        >>> certain = lambda ids: torch.nn.functional.one_hot(ids.roll(-1, 1), 10).double() * 100
        >>> float(perplexity(certain, torch.randint(0, 10, (64,)), seq_len=8)) < 1.0001   # knows the next token
        True
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    windows = _windows(tokens, seq_len)
    device = _model_device(model)
    total, count = 0.0, 0
    state = preserved_state(model) if isinstance(model, nn.Module) else _no_state()
    with state:
        for chunk in windows.split(batch_size):
            ids = chunk if device is None else chunk.to(device)
            z = logits(model(ids))
            if z.dim() != 3 or z.shape[:2] != ids.shape:
                raise ValueError(f"expected logits of shape {tuple(ids.shape)} + (V,), got {tuple(z.shape)}")
            logp = F.log_softmax(z[:, :-1].double(), dim=-1)
            total += float(-logp.gather(-1, ids[:, 1:, None]).sum())
            count += ids[:, 1:].numel()
    return _result(total, count, seq_len, windows.shape[0])


class _no_state:
    """A do-nothing context for models that are plain callables (no train/eval flags to keep)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def unigram_perplexity(train_tokens: torch.Tensor, tokens: torch.Tensor, seq_len: int, vocab_size: int) -> Perplexity:
    """The baseline a language model must beat: perplexity of the add-one-smoothed unigram distribution
    of ``train_tokens`` on the same predicted tokens of ``tokens`` that :func:`perplexity` scores.

    Example:
        >>> import torch
        >>> from pyobc.metrics import unigram_perplexity
        >>> unigram_perplexity(torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]), seq_len=2, vocab_size=2)
        Perplexity(2, seq_len=2, windows=2, predicted_tokens=2)
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(train_tokens, torch.Tensor) or train_tokens.dtype.is_floating_point or train_tokens.numel() == 0:
        raise TypeError("train_tokens must be a non-empty integer tensor")
    train = train_tokens.reshape(-1)
    if int(train.min()) < 0 or int(train.max()) >= vocab_size:
        raise ValueError(f"train_tokens must be in [0, {vocab_size})")
    windows = _windows(tokens, seq_len)
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    predicted = windows[:, 1:].reshape(-1)
    if int(predicted.max()) >= vocab_size or int(predicted.min()) < 0:
        raise ValueError(f"tokens must be in [0, {vocab_size})")
    return _result(float(-logp[predicted].sum()), predicted.numel(), seq_len, windows.shape[0])
