"""The oracle: the measured loss change of removing each channel (Molchanov et al., 2019)."""
from __future__ import annotations

import sys

import torch

from . import register
from .base import Criterion, Result
from ..masking import keep_masks

__all__ = ["Oracle"]


@register
class Oracle(Criterion):
    """``score(s) = L(structure s zeroed) - L(original)`` for every structure ``s`` (one root channel of one
    group; every parameter slice of it is zeroed, as :func:`pyobc.masking.keep_masks` defines), with ``L``
    the mean loss over the loader's samples (each batch's mean loss weighted by its size). Higher = more
    important; negative where removing the channel lowers the loss.

    It costs **one forward pass over the data per structure** (evaluation only, no gradients): the
    reference against which cheaper criteria are judged (Spearman correlation), not a criterion for large
    models. The model is never modified: zeroed parameters are substituted functionally
    (``Context.loss(batch, params=...)``), in eval mode (BatchNorm running statistics untouched).

    Work is batch-major: each batch is read once from the loader, its base loss is computed once, then
    every structure is evaluated on it. Per-structure loss changes are summed into additive
    accumulators, so nothing but those sums is kept (no copy of the data set) and data-parallel scoring
    only has to add them up.

    With ``pyobc.score(..., progress=True)`` (default: when stderr is a terminal) a second bar counts the
    structures of each batch.
    """

    name = "oracle"
    description = "oracle: measured loss change of zeroing each channel (one pass over the data per channel)"
    evaluation_only = True

    def validate(self) -> None:
        self._structures = [(gi, g.root, c) for gi, g in enumerate(self.ctx.groups) for c in range(g.size)]

    def _zeroed(self, theta: dict[str, torch.Tensor], root: str, channel: int) -> dict[str, torch.Tensor]:
        masks = keep_masks(self.ctx.groups, theta, {root: [channel]})
        out = dict(theta)
        for name, mask in masks.items():
            t = theta[name]
            out[name] = t * mask.to(t.device, t.dtype)
        return out

    def update(self, batch) -> None:
        ctx = self.ctx
        theta = ctx.theta
        bar = None
        if ctx.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(self._structures), desc=f"pyobc oracle (batch {batch.index})", unit="channel",
                       file=sys.stderr, leave=False)
        dtype = torch.float64
        delta = torch.zeros(sum(g.size for g in ctx.groups), dtype=dtype, device=ctx.device)
        try:
            with torch.no_grad():
                base = ctx.loss(batch, params=theta).to(dtype)
                for k, (_, root, c) in enumerate(self._structures):
                    delta[k] = ctx.loss(batch, params=self._zeroed(theta, root, c)).to(dtype) - base
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self.add("dl", delta * batch.size)  # per-batch means weighted by the batch's sample count
        self.add("samples", batch.size)

    def finalize(self) -> Result:
        layout = self.ctx.layout
        mean = self.acc["dl"] / self.count("samples")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.ctx.params.values()) else torch.float32
        return Result(layout.split(mean.to(dtype)))
