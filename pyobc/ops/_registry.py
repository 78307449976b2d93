"""The operator table and the loader of the compiled library.

Adding an operator: its schema line in ``csrc/ops.cpp`` and one :class:`OpSpec` row in ``OPS`` below
(schema string, reference kernel in ``reference.py``, fake in ``_fakes.py``, argument checks in ``_checks.py``, autograd formula in
``_autograd.py`` if it has one), one kernel file per backend named after the op
(``csrc/cpu/<op>.cpp``, ``csrc/cuda/<op>.cu``, each registering only its op), and a public wrapper
in ``__init__.py``. Nothing else changes: :func:`install` registers whatever the table lists.

Loading (:func:`install`, run once when ``pyobc.ops`` is imported):

1. ``import pyobc._C`` unless ``PYOBC_DISABLE_EXT=1``. Importing it registers the compiled schemas
   and kernels with torch's dispatcher. A failure is kept
   (``backend_report()["extension"]["error"]``) and reported with one ``RuntimeWarning``: there is
   no silent fallback.
2. Every op of the table the compiled library did not define is defined from its schema string
   here, so ``torch.ops.pyobc.<op>`` exists either way.
3. Each of the CPU and CUDA dispatch keys without a compiled kernel gets the reference kernel
   (e.g. CUDA tensors with a CPU-only build), recorded per op and device.
4. Fakes (for torch.compile) and autograd formulas are registered for every op that exists.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import warnings
from typing import Callable

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _autograd, _fakes, reference

NAMESPACE = "pyobc"
_DEVICE_KEYS = (("cpu", "CPU"), ("cuda", "CUDA"))


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    schema: str  # must equal the m.def(...) string in csrc/ops.cpp (checked by tests/test_ops.py)
    reference: Callable
    fake: Callable
    setup_context: Callable | None = None
    backward: Callable | None = None

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"


OPS: tuple[OpSpec, ...] = (
    OpSpec(
        name="channel_dot",
        schema="channel_dot(Tensor a, Tensor b, int dim, bool per_sample=False) -> Tensor",
        reference=reference.channel_dot,
        fake=_fakes.channel_dot_fake,
        setup_context=_autograd.channel_dot_setup_context,
        backward=_autograd.channel_dot_backward,
    ),
    OpSpec(
        name="weight_channel_sums",
        schema="weight_channel_sums(Tensor w, Tensor t, int groups=1) -> (Tensor, Tensor)",
        reference=reference.weight_channel_sums,
        fake=_fakes.weight_channel_sums_fake,
        setup_context=_autograd.weight_channel_sums_setup_context,
        backward=_autograd.weight_channel_sums_backward,
    ),
    OpSpec(
        name="csr_gather_sum",
        schema="csr_gather_sum(Tensor values, Tensor rowptr, Tensor col, Tensor? weight=None) "
               "-> Tensor",
        reference=reference.csr_gather_sum,
        fake=_fakes.csr_gather_sum_fake,
        setup_context=_autograd.csr_gather_sum_setup_context,
        backward=_autograd.csr_gather_sum_backward,
    ),
    OpSpec(
        name="csr_gather_reduce",
        schema="csr_gather_reduce(Tensor values, Tensor rowptr, Tensor col, str reduce) -> Tensor",
        reference=reference.csr_gather_reduce,
        fake=_fakes.csr_gather_reduce_fake,
        setup_context=_autograd.csr_gather_reduce_setup_context,
        backward=_autograd.csr_gather_reduce_backward,
    ),
    OpSpec(
        name="channel_scale",
        schema="channel_scale(Tensor x, Tensor scale, int dim, bool per_sample=False) -> Tensor",
        reference=reference.channel_scale,
        fake=_fakes.channel_scale_fake,
        setup_context=_autograd.channel_scale_setup_context,
        backward=_autograd.channel_scale_backward,
    ),
    OpSpec(
        name="conv2d_sq_grad_sums",
        schema="conv2d_sq_grad_sums(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, "
               "int[] dilation) -> Tensor",
        reference=reference.conv2d_sq_grad_sums,
        fake=_fakes.conv2d_sq_grad_sums_fake,
    ),
    OpSpec(
        name="gather_channels",
        schema="gather_channels(Tensor[] tensors, int[] dims, Tensor[] indices) -> Tensor[]",
        reference=reference.gather_channels,
        fake=_fakes.gather_channels_fake,
        setup_context=_autograd.gather_channels_setup_context,
        backward=_autograd.gather_channels_backward,
    ),
)

# Python-side registrations live as long as this Library object (i.e. the process).
_LIB: torch.library.Library | None = None
_STATE: dict = {
    "extension": {"status": "not loaded", "error": None, "path": None},
    "ops": {},
}


def _library() -> torch.library.Library:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    return _LIB


def _load_extension() -> dict:
    if os.environ.get("PYOBC_DISABLE_EXT", "").strip() == "1":
        return {"status": "disabled", "error": "PYOBC_DISABLE_EXT=1", "path": None}
    try:
        module = importlib.import_module(f"{NAMESPACE}._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol, wrong torch), ...
        error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"pyobc: the compiled operator library pyobc._C could not be loaded ({error}); "
            "using the pure-PyTorch reference kernels, which are slower and allocate full-size "
            "temporaries. Rebuild with `pip install --no-build-isolation -e .` or set "
            "PYOBC_DISABLE_EXT=1 to silence this warning.",
            RuntimeWarning, stacklevel=4)
        return {"status": "failed", "error": error, "path": None}
    return {"status": "loaded", "error": None, "path": getattr(module, "__file__", None)}


def _existing_schema(spec: OpSpec) -> str | None:
    try:
        packet = getattr(getattr(torch.ops, NAMESPACE), spec.name)
    except (AttributeError, RuntimeError):
        return None
    return str(packet.default._schema)


def _has_kernel(spec: OpSpec, key: str) -> bool:
    # private but long-standing torch API (no public equivalent as of torch 2.13)
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(spec.qualname, key))


def _install_op(spec: OpSpec) -> dict:
    info = {"schema": None, "defined_by": None, "cpu": "unavailable", "cuda": "unavailable"}
    schema = _existing_schema(spec)
    if schema is not None:
        info["defined_by"] = "compiled"
        if schema != f"{NAMESPACE}::{spec.schema}":
            warnings.warn(f"pyobc: the compiled schema of {spec.qualname} ({schema}) differs from "
                          f"the Python one ({spec.schema}); the compiled library is stale, rebuild "
                          "it", RuntimeWarning, stacklevel=3)
    else:
        try:
            _library().define(spec.schema)
        except Exception as exc:
            info["error"] = f"{type(exc).__name__}: {exc}"
            return info  # the op does not exist: register nothing else for it
        info["defined_by"] = "python"
        schema = _existing_schema(spec)
    info["schema"] = schema

    for device, key in _DEVICE_KEYS:
        if _has_kernel(spec, key):
            info[device] = "compiled"
        else:
            _library().impl(spec.name, spec.reference, key)
            info[device] = "reference"
    torch.library.register_fake(spec.qualname, spec.fake, lib=_library())
    if spec.backward is not None:
        torch.library.register_autograd(spec.qualname, spec.backward,
                                        setup_context=spec.setup_context, lib=_library())
    return info


_INSTALLED = False


def install() -> None:
    """Loads the compiled library (if possible) and registers every op of :data:`OPS`.

    Idempotent: runs once per process (at the first import of :mod:`pyobc.ops`)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _STATE["extension"] = _load_extension()
    for spec in OPS:
        _STATE["ops"][spec.name] = _install_op(spec)


def backend_report() -> dict:
    """Which implementation serves each op; see :func:`pyobc.ops.backend_report`."""
    ext = dict(_STATE["extension"])
    ext["cuda_kernels"] = any(info.get("cuda") == "compiled" for info in _STATE["ops"].values())
    return {
        "extension": ext,
        "cuda_available": torch.cuda.is_available(),
        "ops": {name: {key: info[key] for key in ("cpu", "cuda", "schema", "error") if key in info}
                for name, info in copy.deepcopy(_STATE["ops"]).items()},
    }


# --------------------------------------------------------------------------------------------
# calling an op from the public wrappers (and Layout) with little Python overhead
# --------------------------------------------------------------------------------------------

# torch's own Python autograd kernels (torch/_library/autograd.py) redispatch below autograd
# with this guard; without it, every call pays for the Python autograd layer of
# register_autograd (tens of microseconds) even when no gradient can flow.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def forward_transforms_active() -> bool:
    """Whether forward-mode AD or a functorch transform is active (the ops have no formulas for them)."""
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def has_tangent(tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent (of the current dual level)."""
    level = _forward_ad._current_level
    return level >= 0 and any(t is not None and torch._unpack_dual(t, level).tangent is not None for t in tensors)


def autograd_needed(tensors) -> bool:
    """Whether a call on ``tensors`` must go through the ops' autograd kernels: some input
    requires grad with grad mode on, or a functorch transform is active (whose wrappers must
    never be dropped).

    Plain tensors inside a forward-mode region (the channel dots of OBA's forward-over-reverse
    backward, on unpacked values and tangents) skip the Python autograd layer: without an input
    tangent the output has none either (inputs with tangents never get here, see :func:`call`)."""
    if _BELOW_AUTOGRAD is None or torch._C._are_functorch_transforms_active():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: op name -> its pure-PyTorch reference kernel, made of torch ops that forward-mode AD differentiates
_REFERENCES = {spec.qualname: spec.reference for spec in OPS}


def call(op, args: tuple, tensors, validate: Callable[[], object]):
    """``op(*args)``, below autograd when no gradient can flow. Arguments are validated only when
    the call fails: ``validate()`` then raises the precise ``TypeError``/``ValueError`` for
    malformed arguments, and otherwise the op's own error (e.g. an index out of range) propagates.
    Under ``torch.compile`` the arguments are validated first and the op called plainly."""
    if torch.compiler.is_compiling():
        validate()
        return op(*args)
    if has_tangent(tensors):
        # the ops' autograd formulas are reverse-mode only, and torch's custom-op autograd layer
        # would drop the tangent without a word: the reference's torch ops carry it
        return _REFERENCES[op._schema.name](*args)
    try:
        if autograd_needed(tensors):
            return op(*args)
        with _BELOW_AUTOGRAD():
            return op(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised below
        error = exc
    validate()
    raise error
