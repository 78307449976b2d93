"""Optimal Brain Damage (LeCun et al., 1989) with the diagonal empirical Fisher."""
from __future__ import annotations

from torch import Tensor

from ..scoring.per_sample_pass import PerSamplePass
from . import register
from .base import Criterion, Result


@register
class OBD(Criterion):
    """``1/2 sum_{i in s} theta_i^2 F_ii`` with ``F_ii`` the mean over samples of the squared per-sample
    gradient. Per-sample gradients are never looped over in Python: conv and linear layers with few
    output positions per sample take the sums from one product over pairs of positions (``(G^2)^T (X^2)``
    for a linear layer on 2-D inputs) without forming per-sample gradients, the others form them with
    grouped weight-gradient convolutions (or batched products) in cache-sized chunks of samples, and
    norms use closed forms.

    Per-weight scores (``granularity="weight"``): ``1/2 theta_i^2 F_ii``.
    """

    name = "obd"
    description = "Optimal Brain Damage: 1/2 theta^2 times the diagonal empirical Fisher, summed per group"
    granularities = ("channel", "weight")

    def update(self, batch) -> None:
        sp = PerSamplePass(self.ctx, batch, params=self.wanted_params(), sq_sums=True)
        for n, f in sp.sq_grad_sums().items():
            self.add(f"F:{n}", f)
        self.add("samples", batch.size)

    def fisher(self) -> dict[str, Tensor]:
        ns = self.count("samples")
        return {k[2:]: v / ns for k, v in self.acc.items() if k.startswith("F:")}

    def finalize(self) -> Result:
        theta, layout = self.ctx.theta, self.ctx.layout
        fisher = self.fisher()
        half = {n: 0.5 * theta[n] * f for n, f in fisher.items()}
        channel = layout.split(layout.group_sum(self.channels(theta, half)))
        return Result(channel, self.weight_scores(compute=lambda: {n: theta[n] * h for n, h in half.items()}))
