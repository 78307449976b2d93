"""Squared per-sample gradient sums of conv and linear layers from pairs of output positions.

A conv or linear layer's per-sample weight gradient is a sum over its output positions ``l`` (pixels,
tokens) of outer products, ``G_n = sum_l g_nl p_nl^T`` (``p_nl``: the input patch or token behind position
``l``, ``g_nl``: the output gradient there). Squared elementwise and summed over the samples::

    sum_n G_n**2 = sum_n sum_{l, l'} (g_nl * g_nl') (p_nl * p_nl')^T = A^T B

one matrix product over the rows ``(n, l <= l')`` (pairs ``l < l'`` weighted twice). With few positions
(``L (L + 1) / 2`` rows per sample) that is one plain GEMM and no per-sample gradient is formed, which is
what late layers of ImageNet networks on small inputs need (ResNet-18 on 32x32 images: 1x1 and 2x2
feature maps, 2.4M-weight convs whose per-sample gradients are 9.4 MB each). With many positions forming
the per-sample gradients is cheaper: :func:`pyobc.scoring.per_sample.sq_grad_sums` chooses. For one
position it is OBD's classic linear-layer form ``(G^2)^T (X^2)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["positions", "position_count", "pair_sq_sums", "PAIR_CHUNK_BYTES"]

#: bytes of pair rows (both factors) formed at once by :func:`pair_sq_sums`
PAIR_CHUNK_BYTES = 16 * 2**20


def _supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
                                             and not module.transposed)


def position_count(module: nn.Module, g: torch.Tensor) -> int | None:
    """Output positions per sample of one call (``g``: its output gradient), without forming patches;
    None for layers :func:`positions` does not serve.

    Example:
        >>> conv, linear = nn.Conv2d(2, 3, 3), nn.Linear(2, 3)
        >>> position_count(conv, torch.zeros(4, 3, 2, 5)), position_count(linear, torch.zeros(4, 7, 3))
        (10, 7)
    """
    if not _supported(module):
        return None
    per_sample = g[0].numel() if g.shape[0] else 0
    return per_sample // (g.shape[-1] if isinstance(module, nn.Linear) else g.shape[1])


def positions(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(patches (n, L, J), gradients (n, L, O))`` of one call of a linear layer or an ungrouped,
    zero-padded 1-D/2-D conv, such that its per-sample weight gradient is ``sum_l g[:, l]^T patches[:, l]``
    (``J`` in the order of the weight's flattened input dims); None for other layers.

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> p, g = positions(conv, torch.randn(4, 2, 2, 2), torch.randn(4, 3, 2, 2))
        >>> p.shape, g.shape
        (torch.Size([4, 4, 18]), torch.Size([4, 4, 3]))
    """
    n = x.shape[0]
    if not _supported(module):
        return None
    if isinstance(module, nn.Linear):
        return x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
    if isinstance(module, nn.Conv1d):  # as a 2-D conv over a height of 1
        x, k, d, p, s = x.unsqueeze(2), (1,) + module.kernel_size, (1,) + module.dilation, \
            (0,) + module.padding, (1,) + module.stride
    else:
        k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
    cols = F.unfold(x, k, d, p, s)  # (n, J, L), J in the order (in channel, kernel positions)
    return cols.transpose(1, 2), g.reshape(n, g.shape[1], -1).transpose(1, 2)


def pair_sq_sums(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum_n (sum_l g_nl p_nl^T)**2`` as an ``(O, J)`` matrix, the positions of all ``parts`` (the calls
    of one layer, each from :func:`positions`) taken together, so that the calls' gradients add per
    sample before squaring.

    Example:
        >>> p, g = torch.randn(5, 3, 4), torch.randn(5, 3, 2)
        >>> per_sample = torch.einsum("nlo,nlj->noj", g, p)
        >>> torch.allclose(pair_sq_sums([(p, g)]), (per_sample ** 2).sum(0), atol=1e-5)
        True
    """
    p = torch.cat([q for q, _ in parts], dim=1)
    g = torch.cat([h for _, h in parts], dim=1)
    n, length, j = p.shape
    o = g.shape[2]
    li, lj = torch.triu_indices(length, length, device=p.device)
    twice = torch.where(li == lj, 1.0, 2.0).to(device=g.device, dtype=g.dtype)
    rows = li.numel()
    step = max(1, PAIR_CHUNK_BYTES // max(1, rows * (j + o) * p.element_size()))
    total = p.new_zeros(o, j)
    for s in range(0, n, step):
        ps, gs = p[s:s + step], g[s:s + step]
        a = gs[:, li] * gs[:, lj] * twice[:, None]
        b = ps[:, li] * ps[:, lj]
        total.addmm_(a.reshape(-1, o).t(), b.reshape(-1, j))
    return total
