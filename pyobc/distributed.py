"""Data-parallel scoring over ``torch.distributed``: each rank scores its shard, accumulators are summed.

Every criterion keeps all of its state as additive tensors in ``criterion.acc`` (sums and counts), so
scoring data-parallel is: each rank runs the batch loop over its own shard, the ranks agree that they
are scoring the same thing (one ``all_gather_object`` of a small description), every accumulator is
summed with ``all_reduce``, and every rank finalises the same sums into identical scores.

:func:`pyobc.score` does this by itself when ``torch.distributed`` is initialised with more than one
process (``distributed=None``, the default); ``distributed=False`` scores each rank's loader on its own
with no communication at all (e.g. the whole dataset redundantly on every rank). See
``docs/distributed.md``.

Example (launched with ``torchrun --nproc_per_node=2 script.py``)::

    import torch.distributed as dist, pyobc
    dist.init_process_group("gloo")                 # "nccl" on GPUs (and torch.cuda.set_device)
    loader = pyobc.distributed.sharded_loader(dataset, batch_size=64)
    scores = pyobc.score(model, loader, "jacobian")  # identical on every rank
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# the error types live in the leaf module pyobc.errors; re-exported here, where users look for them
from .errors import (ConfigMismatchError, DistributedScoringError, EmptyLoaderError, EmptyShardError,
                     PeerFailedError)
from .nested import tensors_in

__all__ = [
    "Coordinator", "ShardSampler", "sharded_loader", "is_active",
    "DistributedScoringError", "ConfigMismatchError", "EmptyShardError", "PeerFailedError", "EmptyLoaderError",
]

#: criterion options that only change what a rank displays, so they may differ across ranks (none today:
#: progress bars follow ``pyobc.score(progress=...)``, which is not compared)
LOCAL_OPTIONS: frozenset[str] = frozenset()

#: accumulators are all-reduced in flat buckets of at most this many bytes (bigger tensors go alone)
BUCKET_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------------
# which process group


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _resolve(distributed: Any) -> Any:
    """The process group to combine over, or None for single-process scoring."""
    if distributed is None:
        if _initialised() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if distributed is False:
        return None
    if distributed is True:
        if not _initialised():
            raise RuntimeError("pyobc.score(distributed=True) needs an initialised torch.distributed process "
                               "group: call torch.distributed.init_process_group first (e.g. under torchrun)")
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    if dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        if not _initialised():
            raise RuntimeError("pyobc.score got a process group but torch.distributed is not initialised")
        return distributed if dist.get_world_size(distributed) > 1 else None
    raise TypeError(f"distributed must be None (automatic), True, False or a torch.distributed ProcessGroup, "
                    f"got {type(distributed).__name__}")


def is_active(distributed: Any = None) -> bool:
    """Whether :func:`pyobc.score` with this ``distributed=`` argument would combine across ranks."""
    return _resolve(distributed) is not None


# ---------------------------------------------------------------------------------------------------
# what each rank says about its run


def _canon(value: Any) -> str:
    """A rank-independent text for an option value (no object addresses)."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_canon(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: repr(kv[0]))
        return "{" + ", ".join(f"{_canon(k)}: {_canon(v)}" for k, v in items) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    kind = type(value)
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    return f"<{kind.__module__}.{kind.__qualname__}{' ' + name if name else ''}>"


def _hash(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _groups_hash(groups: Sequence[Any]) -> str:
    def parts():
        for g in groups:
            yield ("group", g.root, g.size, g.divisor)
            for m in g.members:
                yield ("member", m.module, m.kind, m.module_type)
                yield m.index
                yield m.root
                for s in m.slices:
                    yield ("slice", s.param, s.axis, s.groups)
                    yield s.index
                    yield s.root
    return _hash(parts())


def _weights(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> list[float]:
    """Sum, absolute sum and sum of squares (float64) over every parameter and floating buffer."""
    tensors = [t.detach() for t in params.values()]
    tensors += [b.detach() for _, b in model.named_buffers() if b.is_floating_point() or b.is_complex()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            a = t.abs()
            by_device.setdefault(t.device, []).append(torch.stack([
                (a if t.is_complex() else t).sum(dtype=torch.float64), a.sum(dtype=torch.float64),
                a.double().square().sum()]))
    total = torch.zeros(3, dtype=torch.float64)
    for stats in by_device.values():  # one transfer per device
        total += torch.stack(stats).sum(0).to("cpu")
    return total.tolist()


def _data_fingerprint(batch: Any) -> tuple | None:
    """(sum, absolute sum) of every tensor of the first batch: equal on every rank = the same data."""
    if batch is None:
        return None
    out = []
    for t in tensors_in(getattr(batch, "data", batch)):
        t = t.detach()
        t = t.abs() if t.is_complex() else t
        t = t.to(torch.float64)
        out.append(torch.stack([t.sum(), t.abs().sum()]).to("cpu"))
    return tuple(tuple(x.tolist()) for x in out)


def _loss_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


def _describe(criterion: Any, method: str, groups: Sequence[Any], n_batches: int, n_samples: int,
              first: Any) -> dict[str, Any]:
    ctx = criterion.ctx
    signature = [(n, tuple(p.shape), str(p.dtype)) for n, p in ctx.model.named_parameters()]
    return {
        "status": "ok",
        "method": method,
        "granularity": ctx.granularity,
        "options": {k: _canon(v) for k, v in sorted(criterion.opts.items()) if k not in LOCAL_OPTIONS},
        "loss_fn": _loss_name(ctx.loss_fn),
        "model": (f"{len(signature)} parameters of {sum(p.numel() for p in ctx.params.values())} elements, "
                  f"signature {_hash(signature)}"),
        "groups": f"{len(groups)} groups, {sum(g.size for g in groups)} channels, structure {_groups_hash(groups)}",
        "weights": _weights(ctx.model, ctx.params),
        "device_type": torch.device(ctx.device).type,
        "acc": sorted((k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in criterion.acc.items()),
        "batches": int(n_batches),
        "samples": int(n_samples),
        "data": _data_fingerprint(first),
    }


# ---------------------------------------------------------------------------------------------------
# agreeing on a verdict (every rank computes the same one from the same gathered descriptions)


def _ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'ranks 0-2, 5'``."""
    ranks = sorted(ranks)
    spans, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            spans.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def _by_value(descs: Sequence[dict], field: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r, d in enumerate(descs):
        out.setdefault(repr(d[field]) if not isinstance(d[field], str) else d[field], []).append(r)
    return out


def _weights_agree(a: Sequence[float], b: Sequence[float]) -> bool:
    s_a, abs_a, sq_a = a
    s_b, abs_b, sq_b = b
    scale = max(abs_a, abs_b, 1e-300)
    return (abs(s_a - s_b) <= 1e-7 * scale and abs(abs_a - abs_b) <= 1e-7 * scale
            and abs(sq_a - sq_b) <= 1e-7 * max(sq_a, sq_b, 1e-300))


_HINT = ("every rank must call pyobc.score with the same method, options and model (same architecture and "
         "weights, e.g. wrapped in DistributedDataParallel or loaded from one checkpoint); "
         "pass distributed=False to score each rank on its own")


def _verdict(descs: Sequence[dict], rank: int) -> Exception | None:
    """The error this rank raises (None: go on, or re-raise the rank's own error)."""
    world = len(descs)
    failed = [r for r, d in enumerate(descs) if d["status"] != "ok"]
    if failed:
        empty = [r for r in failed if descs[r]["status"] == "empty"]
        if len(empty) == len(failed):
            return EmptyShardError(
                f"pyobc.score: the loader of {_ranks(empty)} (of {world}) yielded no batches; in data-parallel "
                f"scoring every rank needs at least one batch: shard fewer samples over fewer processes, or use "
                f"pyobc.distributed.sharded_loader (it leaves a rank empty only when the dataset has fewer samples "
                f"than there are ranks), or pass distributed=False")
        if descs[rank]["status"] == "error":
            return None
        detail = "; ".join(f"rank {r}: {descs[r]['error']}" for r in failed[:4]) + (
            f"; and {len(failed) - 4} more" if len(failed) > 4 else "")
        return PeerFailedError(f"pyobc.score: {_ranks(failed)} (of {world}) failed before the ranks combined "
                               f"their accumulators, so this rank stops too: {detail}")

    def mismatch(what: str, field: str) -> ConfigMismatchError:
        by = list(_by_value(descs, field).items())
        values = "; ".join(f"{v} on {_ranks(rs)}" for v, rs in by[:4]) + (
            f"; and {len(by) - 4} other values" if len(by) > 4 else "")
        return ConfigMismatchError(f"pyobc.score: ranks disagree on the {what}: {values}. {_HINT}")

    for what, field in (("method", "method"), ("granularity", "granularity")):
        if len(_by_value(descs, field)) > 1:
            return mismatch(what, field)
    if len(_by_value(descs, "options")) > 1:
        keys = sorted({k for d in descs for k in d["options"]})
        differ = [k for k in keys if len({d["options"].get(k, "<unset>") for d in descs}) > 1]
        for d in descs:
            d["options_differing"] = ", ".join(f"{k}={d['options'].get(k, '<unset>')}" for k in differ)
        return mismatch("criterion options", "options_differing")
    for what, field in (("loss function", "loss_fn"), ("model (parameter names, shapes and dtypes)", "model"),
                        ("scoring device type", "device_type")):
        if len(_by_value(descs, field)) > 1:
            return mismatch(what, field)
    ref = descs[0]["weights"]
    differ = [r for r, d in enumerate(descs) if not _weights_agree(ref, d["weights"])]
    if differ:
        return ConfigMismatchError(
            f"pyobc.score: ranks disagree on the model's weights (parameters and floating buffers): {_ranks(differ)} "
            f"{'differs' if len(differ) == 1 else 'differ'} from rank 0 (sum, |sum|, sum of squares: "
            + "; ".join(f"rank {r}: ({', '.join(f'{x:.9g}' for x in descs[r]['weights'])})" for r in [0] + differ[:3])
            + f"). {_HINT}")
    if len(_by_value(descs, "groups")) > 1:
        return mismatch("channel groups (the traced structure of the model)", "groups")
    seen: dict[str, tuple[tuple, str, int]] = {}
    for r, d in enumerate(descs):
        for key, shape, dtype in d["acc"]:
            if key in seen and seen[key][:2] != (shape, dtype):
                s0, t0, r0 = seen[key]
                return ConfigMismatchError(
                    f"pyobc.score: accumulator {key!r} is {t0} {list(s0)} on rank {r0} but {dtype} {list(shape)} "
                    f"on rank {r}: the ranks cannot be combined. {_HINT}")
            seen.setdefault(key, (shape, dtype, r))
    return None


# ---------------------------------------------------------------------------------------------------
# the reduction


def _comm_device(group: Any, descs: Sequence[dict]) -> torch.device:
    """Where the collectives run: CPU for Gloo, the current GPU for NCCL, else the common scoring device."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:
        supported = {part.split(":")[0].strip() for part in backend.split(",")}
    elif backend == "nccl":
        supported = {"cuda"}
    elif backend == "xccl":
        supported = {"xpu"}
    else:  # gloo, mpi, ...: host memory
        supported = {"cpu"}
    types = {d["device_type"] for d in descs}
    kind = next(iter(types)) if len(types) == 1 and next(iter(types)) in supported else (
        "cpu" if "cpu" in supported else sorted(supported)[0])
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _reduce(acc: dict[str, torch.Tensor], keys: Sequence[tuple[str, tuple, str]], device: torch.device,
            comm: torch.device, group: Any) -> None:
    """Sum every accumulator over the group, replacing the entries of ``acc`` (keys a rank lacks count as zeros).

    ``keys`` (name, shape, dtype name) come from the gathered descriptions, so every rank builds the
    same buckets in the same order: per dtype, flat buckets of at most :data:`BUCKET_BYTES` (a bigger
    tensor goes alone and, already on ``comm``, is reduced in place).
    """
    buckets: list[list[tuple[str, tuple, torch.dtype]]] = []
    open_bucket: dict[torch.dtype, list] = {}
    used: dict[torch.dtype, int] = {}
    for key, shape, dname in keys:
        dtype = getattr(torch, dname)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if dtype not in open_bucket or used[dtype] + nbytes > BUCKET_BYTES:
            open_bucket[dtype], used[dtype] = [], 0
            buckets.append(open_bucket[dtype])
        open_bucket[dtype].append((key, shape, dtype))
        used[dtype] += nbytes
    for bucket in buckets:
        parts = [(acc[key] if key in acc else torch.zeros(shape, dtype=dtype, device=device)).detach()
                 .to(comm).reshape(-1) for key, shape, dtype in bucket]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for key, shape, _ in bucket:
            n = math.prod(shape)
            home = acc[key].device if key in acc else device
            acc[key] = flat[offset:offset + n].reshape(shape).to(home)
            offset += n


# ---------------------------------------------------------------------------------------------------
# the coordinator :func:`pyobc.score` drives


class Coordinator:
    """One :func:`pyobc.score` call's part in data-parallel scoring.

    Every rank takes part in exactly one ``all_gather_object``: from :meth:`combine` after its batch
    loop, or from :meth:`fail` if it raised before getting there. From the gathered descriptions all
    ranks reach the same verdict, so an error on one rank (an empty shard, a mismatched configuration,
    any exception) ends the call with an error on every rank instead of leaving the others waiting in a
    collective. Then, and only if every rank is fine, each accumulator is all-reduced (SUM).
    """

    def __init__(self, distributed: Any = None):
        self.group = _resolve(distributed)
        self.active = self.group is not None
        self.done = False  # the one all_gather_object has been entered

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def _gather(self, desc: dict[str, Any]) -> list[dict[str, Any]]:
        self.done = True  # never enter a second gather, even if this one fails
        descs: list[Any] = [None] * self.world_size
        dist.all_gather_object(descs, desc, group=self.group)
        return descs

    def combine(self, criterion: Any, n_batches: int, n_samples: int, *, method: str, groups: Sequence[Any],
                first: Any = None) -> tuple[int, int]:
        """Check that the ranks agree, sum ``criterion.acc`` over them; the total batch and sample counts."""
        if not self.active:
            return n_batches, n_samples
        desc = _describe(criterion, method, groups, n_batches, n_samples, first)
        descs = self._gather(desc)
        error = _verdict(descs, self.rank)
        if error is not None:
            raise error
        if self.rank == 0 and None not in (fps := [d["data"] for d in descs]) and len(set(fps)) == 1:
            warnings.warn(
                f"pyobc.score: all {len(descs)} ranks got the same first batch: the loader does not look sharded, "
                "so every sample is counted once per rank. Use pyobc.distributed.sharded_loader (or a "
                "DistributedSampler), or pass distributed=False to score each rank on its own", stacklevel=3)
        keys = sorted({k for d in descs for k in d["acc"]})
        device = torch.device(criterion.ctx.device)
        _reduce(criterion.acc, keys, device, _comm_device(self.group, descs), self.group)
        return sum(d["batches"] for d in descs), sum(d["samples"] for d in descs)

    def fail(self, exc: BaseException) -> None:
        """Called with the exception a rank raised before :meth:`combine` gathered: tell the other ranks.

        Raises the agreed error where it differs from ``exc`` (an empty shard: the same
        :class:`EmptyShardError` on every rank); otherwise returns and the caller re-raises ``exc``.
        """
        if not self.active or self.done:
            return
        status = "empty" if isinstance(exc, EmptyLoaderError) else "error"
        message = f"{type(exc).__name__}: {exc}"
        if len(message) > 2000:
            message = message[:2000] + "..."
        descs = self._gather({"status": status, "error": message})
        error = _verdict(descs, self.rank)
        if error is not None:
            raise error from exc


# ---------------------------------------------------------------------------------------------------
# sharding data


class ShardSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` that never pads or drops samples.

    Rank ``r`` of ``W`` gets positions ``r, r + W, r + 2W, ...`` of the (optionally shuffled) index
    list, so the shards partition the dataset exactly: every sample is scored once, and shard sizes
    differ by at most one, which is fine because the accumulators are sums. (A plain
    ``DistributedSampler`` repeats samples to even out the shards, or drops them with ``drop_last``.)
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = False, seed: int = 0):
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.num_samples = len(range(self.rank, n, self.num_replicas))
        self.total_size = n

    def __iter__(self):
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return iter(order[self.rank::self.num_replicas])


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if _initialised() else 1
    if rank is None:
        rank = dist.get_rank() if _initialised() else 0
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
    return num_replicas, rank


def sharded_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                   drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None,
                   **kwargs: Any) -> DataLoader:
    """A DataLoader over this rank's shard of ``dataset`` (a :class:`ShardSampler`), for :func:`pyobc.score`.

    Args:
        dataset: a map-style dataset (``len`` and indexing).
        batch_size: samples per batch on each rank.
        shuffle: shuffle before sharding (off by default: per-sample criteria do not care about order,
            and fixed shards make runs reproducible); the same permutation on every rank (``seed``).
        drop_last: drop each rank's last incomplete batch (off: uneven shards and batches are fine,
            the accumulators are sums weighted by each batch's sample count).
        num_replicas, rank: default to the initialised process group's (1 and 0 without one).
        **kwargs: passed to :class:`~torch.utils.data.DataLoader` (``num_workers``, ``collate_fn``,
            ``pin_memory``...).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.zeros(10, dtype=torch.long))
        >>> [b[0].flatten().tolist() for b in sharded_loader(ds, 2, num_replicas=3, rank=1)]
        [[1.0, 4.0], [7.0]]
    """
    for key in ("sampler", "batch_sampler"):
        if key in kwargs:
            raise TypeError(f"sharded_loader builds its own sampler; got {key}=")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    sampler = ShardSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
