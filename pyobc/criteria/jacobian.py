"""The Jacobian criterion of Optimal Brain Connection (Chen et al., 2025)."""
from __future__ import annotations

from ..scoring.per_sample_pass import PerSamplePass
from . import register
from .base import Criterion, Result


@register
class Jacobian(Criterion):
    """``S(group) = sum over members m, rows r of <g_{r,m}, w_m>^2``.

    A row is the gradient of one mini-batch's mean loss (``rows="batch"``, the reference setting: no
    normaliser, group reduction *sum*) or of a single sample's loss (``rows="sample"``, computed from
    activations without forming per-sample gradients). Out-channel members include the bias,
    in-channel members do not, norm members use (gamma, beta). Scores add up over rows, so they stream.
    """

    name = "jacobian"
    description = "Optimal Brain Connection's Jacobian criterion: sum over members and rows of <grad, w>^2"
    defaults = {"rows": "batch"}

    def validate(self) -> None:
        self._choice("rows", ("batch", "sample"))

    def update(self, batch) -> None:
        if self.opts["rows"] == "batch":
            _, grads = self.gradients(batch)
            m = self.channels(self.ctx.theta, grads)
            self.add("member_sq_sums", m * m)
        else:
            rows = PerSamplePass(self.ctx, batch, params=[], rows=True).member_rows()
            self.add("member_sq_sums", (rows * rows).sum(0))

    def finalize(self) -> Result:
        layout = self.ctx.layout
        return Result(layout.split(layout.group_sum(self.acc["member_sq_sums"])))
