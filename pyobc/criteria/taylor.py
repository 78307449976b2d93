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
        self.add("a2", a * a)
        self.add("batches", 1)
        if self.ctx.granularity == "weight":
            for n, g in grads.items():
                self.add(f"w:{n}", (theta[n] * g) ** 2)

    def finalize(self) -> Result:
        nb = self.count("batches")
        channel = self.ctx.layout.split(self.acc["a2"] / nb)
        parameter = None
        if self.ctx.granularity == "weight":
            parameter = {n: self.acc[f"w:{n}"] / nb for n in self.ctx.params}
        return Result(channel, parameter)
