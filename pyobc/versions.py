"""``pyobc.info()``: versions, which backend serves each op, and the available criteria.

(The module is named ``versions`` so that it cannot shadow the function ``pyobc.info``.)
"""
from __future__ import annotations

import platform
from importlib.metadata import version
from typing import Any

import torch

import pyobc

from . import ops
from .criteria import methods

__all__ = ["info", "format_info"]


def info() -> dict[str, Any]:
    """Facts about this installation: versions, op backends (and why the compiled library is absent).

    Example:
        >>> import pyobc
        >>> info = pyobc.info
        >>> sorted(info())
        ['criteria', 'cuda_available', 'ops', 'pyobc', 'python', 'torch', 'torch_pruning']
    """
    try:
        import torch_pruning  # noqa: F401 - importable is what matters (so imported here, where failing is reported)
        tp_version = version("torch-pruning")  # its __version__ attribute lags the release
    except Exception as e:  # noqa: BLE001 - reported, not raised
        tp_version = f"not importable: {e}"
    return {
        "pyobc": pyobc.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": tp_version,
        "cuda_available": torch.cuda.is_available(),
        "ops": ops.backend_report(),
        "criteria": methods(),
    }


def format_info(data: dict[str, Any] | None = None) -> str:
    """:func:`info` as readable text.

    Example:
        >>> from pyobc.versions import format_info
        >>> format_info().startswith("pyobc ")
        True
    """
    data = info() if data is None else data
    lines = [f"pyobc {data['pyobc']}  (python {data['python']}, torch {data['torch']}, "
             f"torch-pruning {data['torch_pruning']}, cuda available: {data['cuda_available']})", ""]
    report = dict(data["ops"])
    ops_table = report.get("ops", {})
    ext = report.get("extension", {})
    lines.append(f"compiled extension: {ext.get('status', 'unknown')}"
                 + (f" ({ext['path']})" if ext.get("path") else "")
                 + (f", CUDA kernels: {'yes' if ext.get('cuda_kernels') else 'no'}"))
    if ext.get("error"):
        lines.append(f"  why it is not used: {ext['error']}")
    if ops_table:
        lines.append("")
        lines.append(f"  {'op':<28}{'cpu':<12}{'cuda':<12}")
        for op, where in ops_table.items():
            lines.append(f"  {op:<28}{where.get('cpu', '?'):<12}{where.get('cuda', '?'):<12}")
    lines.append("")
    lines.append("criteria:")
    for name, desc in data["criteria"].items():
        lines.append(f"  {name:<12}{desc}")
    return "\n".join(lines)
