"""Argument checks and fake (meta) implementations of the pyobc operators.

The checks raise ``TypeError`` for type/dtype problems and ``ValueError`` for shape/dim/device
problems, naming the offending argument. They are shared by the public wrappers, the fake kernels
(used by ``torch.compile``/FakeTensor tracing) and the pure-PyTorch reference kernels, so every path
rejects the same inputs with the same message. The compiled kernels repeat them in C++
(``csrc/common.h``) for direct ``torch.ops.pyobc.*`` calls.
"""
from __future__ import annotations

import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """Output dtype of the channel reductions: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the reference kernels: float64 for float32/float64 input, float32 for
    float16/bfloat16 (the compiled CPU kernels sum float32 input in short float32 blocks whose sums
    are added in float64)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _check_int(op: str, name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}") from None


def _check_pair(op: str, x, y, nx: str, ny: str) -> None:
    for value, name in ((x, nx), (y, ny)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {value.layout}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, "
                            f"got {value.dtype}")
    if x.dtype != y.dtype:
        raise TypeError(f"{op}: {nx} and {ny} must have the same dtype, "
                        f"got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{op}: {nx} and {ny} must be on the same device, "
                         f"got {x.device} and {y.device}")
    if x.shape != y.shape:
        raise ValueError(f"{op}: {nx} and {ny} must have the same shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def check_channel_dot(a, b, dim, per_sample) -> int:
    """Validates channel_dot arguments; returns ``dim`` normalised to ``[0, a.dim())``."""
    op = "channel_dot"
    _check_pair(op, a, b, "a", "b")
    dim = _check_int(op, "dim", dim)
    if not isinstance(per_sample, bool):
        raise TypeError(f"{op}: per_sample must be a bool, got {type(per_sample).__name__}")
    nd = a.dim()
    if nd == 0:
        raise ValueError(f"{op}: a must have at least 1 dimension (the channel dim), got a scalar")
    if not -nd <= dim < nd:
        raise ValueError(f"{op}: dim={dim} is out of range for a {nd}-d tensor")
    dim %= nd
    if per_sample:
        if nd < 2:
            raise ValueError(f"{op}: per_sample=True needs at least 2 dims (batch, channel), "
                             f"got a {nd}-d tensor")
        if dim == 0:
            raise ValueError(f"{op}: per_sample=True keeps dim 0 (the batch), so dim must not be 0")
    return dim


def check_weight_channel_sums(w, t, groups) -> int:
    """Validates weight_channel_sums arguments; returns ``groups`` as an int."""
    op = "weight_channel_sums"
    _check_pair(op, w, t, "w", "t")
    groups = _check_int(op, "groups", groups)
    if w.dim() < 2:
        raise ValueError(f"{op}: w must have at least 2 dims (O, I/groups, *kernel), "
                         f"got shape {tuple(w.shape)}")
    if groups < 1:
        raise ValueError(f"{op}: groups must be >= 1, got {groups}")
    if w.shape[0] % groups != 0:
        raise ValueError(f"{op}: groups={groups} does not divide the out-channel count "
                         f"{w.shape[0]} of w")
    return groups


# --------------------------------------------------------------------------------------------
# fake kernels: output metadata only (registered with torch.library.register_fake)
# --------------------------------------------------------------------------------------------

def channel_dot_fake(a, b, dim, per_sample=False):
    dim = check_channel_dot(a, b, dim, per_sample)
    shape = (a.shape[0], a.shape[dim]) if per_sample else (a.shape[dim],)
    return a.new_empty(shape, dtype=result_dtype(a.dtype))


def weight_channel_sums_fake(w, t, groups=1):
    groups = check_weight_channel_sums(w, t, groups)
    dtype = result_dtype(w.dtype)
    return (w.new_empty((w.shape[0],), dtype=dtype),
            w.new_empty((groups * w.shape[1],), dtype=dtype))
