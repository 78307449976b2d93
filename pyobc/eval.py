"""``pyobc.eval``: model evaluation under the name users look for (``pyobc.eval.perplexity``).

The implementations live in :mod:`pyobc.metrics` (one place); this module only names them. Importing it
as ``from pyobc import eval`` would hide Python's built-in ``eval`` in that namespace: write
``pyobc.eval.perplexity(...)`` instead.

Example:
    >>> import torch, pyobc
    >>> uniform = lambda ids: torch.zeros(*ids.shape, 50)     # every next token equally likely
    >>> pyobc.eval.perplexity(uniform, torch.randint(0, 50, (1000,)), seq_len=100)
    Perplexity(50, seq_len=100, windows=10, predicted_tokens=990)
"""
from __future__ import annotations

from .metrics import Perplexity, perplexity, unigram_perplexity

__all__ = ["Perplexity", "perplexity", "unigram_perplexity"]
