"""First-order Taylor (Molchanov et al., CVPR 2019), group form."""
from __future__ import annotations

from . import register
from .base import Criterion, Result


@register
class Taylor(Criterion):
    """Per batch t, ``a_{s,t} = sum_{i in s} theta_i g_{i,t}`` over *all* parameters of the group
    (conv weights and biases, BatchNorm scale and shift, consumer in-channels); score = mean_t a^2.

    Per-weight scores (``granularity="weight"``): mean over batches of ``(theta_i g_i)^2``.
    """

    name = "taylor"
    description = "first-order Taylor (Molchanov 2019): mean over batches of the squared group sum of theta*grad"
    granularities = ("channel", "weight")

    def update(self, batch) -> None:
        _, grads = self.gradients(batch)
        theta, layout = self.ctx.theta, self.ctx.layout
        a = layout.group_sum(self.channels(theta, grads))
        self.add("group_sq_sums", a * a)
        self.add("batches", 1)
        self.add_weight_scores(lambda: {n: (theta[n] * g) ** 2 for n, g in grads.items()})

    def finalize(self) -> Result:
        nb = self.count("batches")
        channel = self.ctx.layout.split(self.acc["group_sq_sums"] / nb)
        return Result(channel, self.weight_scores(nb))
