"""Magnitude: the p-norm (to the p) of every weight removed with a channel. Needs no data."""
from __future__ import annotations

from . import register
from .base import Criterion, Result


@register
class Magnitude(Criterion):
    """``sum_{i in s} |theta_i|^p`` over every parameter of the group (p = 1 or 2).

    With ``p=2`` and ``pyobc.prune(..., scope="local")`` (the same fraction cut from every group) this is
    Torch-Pruning's LLM recipe (``GroupMagnitudeImportance(p=2)`` with a uniform pruning ratio).

    Example:
        >>> import torch, pyobc
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> s = pyobc.score(net, None, "magnitude", example_inputs=torch.randn(2, 2))
        >>> w1, b1, w2 = net[0].weight, net[0].bias, net[2].weight
        >>> expected = (w1 ** 2).sum(1) + b1 ** 2 + (w2 ** 2).sum(0)
        >>> torch.allclose(s.values[0], expected.detach())
        True
    """

    name = "magnitude"
    description = ("weight magnitude: sum of |theta|^p over every parameter removed with the channel (no data); "
                   "p=2 with scope='local' is Torch-Pruning's LLM recipe")
    granularities = ("channel", "weight")
    needs_data = False
    defaults = {"p": 2}

    def validate(self) -> None:
        self._choice("p", (1, 2))

    def finalize(self) -> Result:
        theta, layout, p = self.ctx.theta, self.ctx.layout, self.opts["p"]
        # sum |theta|^p = sum theta * theta (p=2) or theta * sign(theta) (p=1): the shared pair reduction
        other = {n: (t if p == 2 else t.sign()) for n, t in theta.items()}
        channel = layout.split(layout.group_sum(self.channels(theta, other)))
        return Result(channel, self.weight_scores(compute=lambda: {n: t.abs() ** p for n, t in theta.items()}))
