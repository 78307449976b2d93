"""Data-parallel scoring over ``torch.distributed`` (placeholder until the distributed issue lands)."""
from __future__ import annotations

from typing import Any, Sequence

import torch.distributed as dist


def combine(criterion: Any, n_batches: int, n_samples: int, *, method: str, groups: Sequence[Any]) -> tuple[int, int]:
    """Combine accumulators across ranks; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError("data-parallel scoring is not implemented yet: score on one process")
    return n_batches, n_samples
