"""First-order Taylor: Molchanov et al. (CVPR 2019)'s group form, and LLM-Pruner's element-wise form."""
from __future__ import annotations

import torch

from . import register
from .base import Criterion, Result


@register
class Taylor(Criterion):
    """First-order Taylor, in one of two forms (option ``form``).

    ``form="group"`` (default; Molchanov et al. 2019): per batch t, ``a_{s,t} = sum_{i in s} theta_i g_{i,t}``
    over *all* parameters of the group (conv weights and biases, BatchNorm scale and shift, consumer
    in-channels); score = mean_t a^2. Per-weight scores (``granularity="weight"``): mean over batches of
    ``(theta_i g_{i,t})^2``.

    ``form="elementwise"`` (LLM-Pruner's first-order element-wise importance, Ma et al. 2023): score =
    ``sum_{i in s} |theta_i * mean_t g_{i,t}|``, the gradient of the mean loss over the calibration batches
    taken per weight, then the absolute value, then the group sum. Signs cancel across batches but not
    across the weights of a group. Per-weight scores: ``|theta_i * mean_t g_{i,t}|``.

    Example:
        >>> import torch, pyobc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> s = pyobc.score(net, data, "taylor", form="elementwise")
        >>> s.values[0].shape, bool((s.values[0] >= 0).all())
        (torch.Size([6]), True)
    """

    name = "taylor"
    description = ("first-order Taylor: form='group' (Molchanov 2019, default) mean over batches of the squared "
                   "group sum of theta*grad; form='elementwise' (LLM-Pruner) group sum of |theta * mean grad|")
    granularities = ("channel", "weight")
    defaults = {"form": "group"}

    def validate(self) -> None:
        self._choice("form", ("group", "elementwise"))

    def update(self, batch) -> None:
        _, grads = self.gradients(batch)
        theta, layout = self.ctx.theta, self.ctx.layout
        self.add("batches", 1)
        if self.opts["form"] == "elementwise":
            for n, g in grads.items():  # theta * g summed over batches, per weight; abs only at the end
                self.add(f"theta_grad:{n}", theta[n] * g)
            return
        a = layout.group_sum(self.channels(theta, grads))
        self.add("group_sq_sums", a * a)
        self.add_weight_scores(lambda: {n: (theta[n] * g) ** 2 for n, g in grads.items()})

    def finalize(self) -> Result:
        nb = self.count("batches")
        layout = self.ctx.layout
        if self.opts["form"] == "elementwise":
            per_weight = {n: self.acc[k].abs() / nb for n in self.ctx.params
                          if (k := f"theta_grad:{n}") in self.acc}
            ones = {n: torch.ones_like(t) for n, t in per_weight.items()}
            channel = layout.split(layout.group_sum(self.channels(per_weight, ones)))
            return Result(channel, self.weight_scores(compute=lambda: per_weight))
        channel = layout.split(self.acc["group_sq_sums"] / nb)
        return Result(channel, self.weight_scores(nb))
