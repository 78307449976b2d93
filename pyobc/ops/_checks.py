"""Argument checks of the pyobc operators.

They raise ``TypeError`` for type/dtype problems and ``ValueError`` for shape/dim/device
problems, naming the offending argument. They are shared by the public wrappers, the fake kernels (:mod:`._fakes`,
used by ``torch.compile``/FakeTensor tracing) and the pure-PyTorch reference kernels, so every path
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


def _check_dense(op: str, *named) -> None:
    """Each ``(value, name)`` is a dense torch.Tensor."""
    for value, name in named:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {value.layout}")


def _check_pair(op: str, x, y, nx: str, ny: str) -> None:
    _check_dense(op, (x, nx), (y, ny))
    for value, name in ((x, nx), (y, ny)):
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


def check_channel_scale(x, scale, dim, per_sample) -> int:
    """Validates channel_scale arguments; returns ``dim`` normalised to ``[0, x.dim())``."""
    op = "channel_scale"
    _check_dense(op, (x, "x"), (scale, "scale"))
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if scale.dtype != x.dtype:
        raise TypeError(f"{op}: x and scale must have the same dtype, got {x.dtype} and {scale.dtype}")
    if x.device != scale.device:
        raise ValueError(f"{op}: x and scale must be on the same device, got {x.device} and {scale.device}")
    dim = _check_int(op, "dim", dim)
    if not isinstance(per_sample, bool):
        raise TypeError(f"{op}: per_sample must be a bool, got {type(per_sample).__name__}")
    nd = x.dim()
    if not 1 <= nd <= 64 or not -nd <= dim < nd:
        raise ValueError(f"{op}: dim={dim} is out of range for a {nd}-d tensor")
    dim %= nd
    if per_sample and (nd < 2 or dim == 0):
        raise ValueError(f"{op}: per_sample=True needs a batch dim 0 and a channel dim other than 0")
    want = (x.shape[0], x.shape[dim]) if per_sample else (x.shape[dim],)
    if tuple(scale.shape) != want:
        raise ValueError(f"{op}: scale must have shape {want} for x of shape {tuple(x.shape)}, dim={dim}"
                         f"{', per_sample=True' if per_sample else ''}; got {tuple(scale.shape)}")
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
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# index ops: csr_gather_sum, csr_gather_reduce, gather_channels
# --------------------------------------------------------------------------------------------

CSR_REDUCTIONS = ("amax", "count_nonzero", "mean_nonzero")


def _check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {value.layout}")


def check_csr(op: str, values, rowptr, col, weight=None) -> None:
    """Validates the metadata of a CSR op's arguments (no data is read, so no device sync)."""
    for name, value in (("values", values), ("rowptr", rowptr), ("col", col)):
        _check_tensor(op, name, value)
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: values must be float32, float64, float16 or bfloat16, "
                        f"got {values.dtype}")
    for name, value in (("rowptr", rowptr), ("col", col)):
        if value.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {value.dtype}")
    if values.dim() not in (1, 2):
        raise ValueError(f"{op}: values must be 1-d (S,) or 2-d (R, S), "
                         f"got shape {tuple(values.shape)}")
    if rowptr.dim() != 1 or rowptr.numel() < 1:
        raise ValueError(f"{op}: rowptr must be a 1-d tensor of N+1 >= 1 offsets, "
                         f"got shape {tuple(rowptr.shape)}")
    if col.dim() != 1:
        raise ValueError(f"{op}: col must be a 1-d tensor, got shape {tuple(col.shape)}")
    for name, value in (("rowptr", rowptr), ("col", col)):
        if value.device != values.device:
            raise ValueError(f"{op}: values, rowptr and col must be on the same device, "
                             f"got {values.device} and {value.device} ({name})")
    if weight is not None:
        _check_tensor(op, "weight", weight)
        if weight.dtype != values.dtype:
            raise TypeError(f"{op}: weight must have the dtype of values ({values.dtype}), "
                            f"got {weight.dtype}")
        if weight.dim() != 1 or weight.numel() != col.numel():
            raise ValueError(f"{op}: weight must be a 1-d tensor with one entry per col entry "
                             f"({col.numel()}), got shape {tuple(weight.shape)}")
        if weight.device != values.device:
            raise ValueError(f"{op}: weight must be on the device of values, "
                             f"got {weight.device} and {values.device}")


def check_csr_reduce(values, rowptr, col, reduce) -> str:
    op = "csr_gather_reduce"
    check_csr(op, values, rowptr, col)
    if not isinstance(reduce, str):
        raise TypeError(f"{op}: reduce must be a str, got {type(reduce).__name__}")
    if reduce not in CSR_REDUCTIONS:
        raise ValueError(f"{op}: reduce must be 'amax', 'count_nonzero' or 'mean_nonzero', "
                         f"got {reduce!r} (use csr_gather_sum for sums)")
    return reduce


def check_csr_data(op: str, values, rowptr, col) -> None:
    """The data rules of a CSR map: rowptr runs from 0 to col.numel() without decreasing, and
    every col entry indexes the last dim of values. Reads the index tensors (a device sync on
    CUDA). Raises RuntimeError, as the compiled kernels do."""
    nnz, num_cols = col.numel(), values.shape[-1]
    first, last = int(rowptr[0]), int(rowptr[-1])
    if first != 0:
        raise RuntimeError(f"{op}: rowptr[0] must be 0, got {first}")
    if rowptr.numel() > 1:
        step = rowptr[1:] - rowptr[:-1]
        if bool((step < 0).any()):
            i = int((step < 0).nonzero()[0, 0])
            raise RuntimeError(f"{op}: rowptr must be non-decreasing, got rowptr[{i}]="
                               f"{int(rowptr[i])} > rowptr[{i + 1}]={int(rowptr[i + 1])}")
    if last != nnz:
        raise RuntimeError(f"{op}: rowptr[-1]={last} must equal the number of entries "
                           f"col.numel()={nnz}")
    if nnz:
        lo, hi = (int(x) for x in torch.aminmax(col))
        if lo < 0 or hi >= num_cols:
            raise RuntimeError(f"{op}: col has entries outside [0, {num_cols}) (the last dim of "
                               f"values): min {lo}, max {hi}")


def _gatherable_dtypes() -> frozenset:
    names = ["uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "float16",
             "float32", "float64", "bfloat16", "complex32", "complex64", "complex128", "bool",
             "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz",
             "float8_e8m0fnu"]
    return frozenset(getattr(torch, n) for n in names if hasattr(torch, n))


GATHER_DTYPES = _gatherable_dtypes()


def check_gather_channels(tensors, dims, indices, one_device: bool = True) -> list[int]:
    """Validates gather_channels arguments (not the index values); returns the normalised dims.

    The op takes tensors of one device (one launch); the public wrapper splits mixed lists and
    checks with ``one_device=False``."""
    op = "gather_channels"
    for name, value in (("tensors", tensors), ("dims", dims), ("indices", indices)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple, got {type(value).__name__}")
    if not len(tensors) == len(dims) == len(indices):
        raise ValueError(f"{op}: got {len(tensors)} tensors, {len(dims)} dims and "
                         f"{len(indices)} index tensors; the three lists must have the same "
                         "length")
    out = []
    for i, (t, d, idx) in enumerate(zip(tensors, dims, indices)):
        _check_tensor(op, f"tensors[{i}]", t)
        _check_tensor(op, f"indices[{i}]", idx)
        if t.dtype not in GATHER_DTYPES or t.is_quantized:
            raise TypeError(f"{op}: tensors[{i}] has unsupported dtype {t.dtype}")
        d = _check_int(op, f"dims[{i}]", d)
        nd = t.dim()
        if nd == 0:
            raise ValueError(f"{op}: tensors[{i}] must have at least 1 dim, got a scalar")
        if not -nd <= d < nd:
            raise ValueError(f"{op}: dims[{i}]={d} is out of range for a {nd}-d tensor")
        if idx.dtype != torch.int64:
            raise TypeError(f"{op}: indices[{i}] must be a 1-d int64 tensor, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"{op}: indices[{i}] must be a 1-d int64 tensor, "
                             f"got shape {tuple(idx.shape)}")
        if idx.device != t.device:
            raise ValueError(f"{op}: indices[{i}] must be on the device of tensors[{i}], "
                             f"got {idx.device} and {t.device}")
        if one_device and t.device != tensors[0].device:
            raise ValueError(f"{op}: all tensors must be on one device, got {tensors[0].device} "
                             f"(tensors[0]) and {t.device} (tensors[{i}]); "
                             "pyobc.ops.gather_channels splits mixed lists itself")
        out.append(d % nd)
    return out


def check_gather_indices_data(tensors, dims, indices) -> None:
    """Every index is in [0, size of its dim). Reads the indices (a device sync on CUDA)."""
    for i, (t, d, idx) in enumerate(zip(tensors, dims, indices)):
        if idx.numel():
            lo, hi = (int(x) for x in torch.aminmax(idx))
            size = t.shape[d]
            if lo < 0 or hi >= size:
                raise RuntimeError(f"gather_channels: indices[{i}] has entries outside "
                                   f"[0, {size}) (the size of dim {d} of tensors[{i}]): "
                                   f"min {lo}, max {hi}")




def _check_int_list(op: str, name: str, value) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be a list of two ints, got {value!r}")
    return tuple(_check_int(op, name, v) for v in value)


def check_conv2d_sq_grad_sums(x, g, kernel_size, stride, padding, dilation) -> tuple:
    """Validates conv2d_sq_grad_sums arguments; returns ``(kernel_size, stride, padding, dilation)`` as
    tuples of two ints."""
    op = "conv2d_sq_grad_sums"
    _check_dense(op, (x, "x"), (g, "g"))
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype}")
    if g.dtype != x.dtype:
        raise TypeError(f"{op}: x and g must have the same dtype, got {x.dtype} and {g.dtype}")
    if x.device != g.device:
        raise ValueError(f"{op}: x and g must be on the same device, got {x.device} and {g.device}")
    if x.dim() != 4 or g.dim() != 4:
        raise ValueError(f"{op}: x and g must be 4-d (N, C, H, W) tensors, got {x.dim()}-d and {g.dim()}-d")
    k, s, p, d = (_check_int_list(op, n, v) for n, v in (("kernel_size", kernel_size), ("stride", stride),
                                                          ("padding", padding), ("dilation", dilation)))
    if min(k + s + d) < 1 or min(p) < 0:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be >= 1 and padding >= 0")
    out = tuple((x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))
    if g.shape[0] != x.shape[0] or tuple(g.shape[2:]) != out:
        raise ValueError(f"{op}: g must have shape ({x.shape[0]}, Co, {out[0]}, {out[1]}) for x of shape "
                         f"{tuple(x.shape)} and this convolution, got {tuple(g.shape)}")
    return k, s, p, d
