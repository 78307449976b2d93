"""Build script of the compiled operator library ``pyobc._C``.

Metadata lives in pyproject.toml; this file only declares the extension.

* Always builds the CPU kernels. The kernels use PyTorch's stable ABI (compiled with
  ``-DTORCH_TARGET_VERSION`` = 2.10) and the CPython limited API, so one binary serves every
  torch >= 2.10 and every CPython >= 3.10 (wheel tag ``cp310-abi3``).
* Adds the CUDA kernels (``csrc/cuda/*.cu``) when the installed torch is a CUDA build
  (``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``/nvcc).
  ``PYOBC_FORCE_CUDA=1`` turns a missing toolkit into an error instead of a CPU-only build and
  requires ``TORCH_CUDA_ARCH_LIST`` (for GPU wheels built on GPU-less builders).
  ``PYOBC_FORCE_CPU=1`` skips CUDA even when it is available.
* ``MAX_JOBS`` limits parallel compile jobs (ninja).

Build with the torch you run with:  ``pip install --no-build-isolation -e .``
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Stable-ABI target: compile against the torch 2.10 stable surface so the binary loads in any later
# torch. Keep in sync with CMakeLists.txt and csrc/cuda/compile_check.sh.
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020a000000000000"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _use_cuda(torch, cpp_extension) -> bool:
    cu_sources = _rel("csrc/cuda/*.cu")
    if _env_flag("PYOBC_FORCE_CPU") or not cu_sources:
        return False
    forced = _env_flag("PYOBC_FORCE_CUDA")
    problem = None
    if torch.version.cuda is None:
        problem = f"the installed torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        problem = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    elif forced and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        problem = "PYOBC_FORCE_CUDA=1 needs TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0+PTX')"
    if problem is None:
        return True
    if forced:
        sys.exit(f"pyobc: cannot build the CUDA kernels: {problem}")
    print(f"pyobc: building CPU kernels only ({problem})", file=sys.stderr)
    return False


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "pyobc: torch must be installed before building pyobc, and the build must see it:\n"
            "    pip install torch==2.13.0 && pip install --no-build-isolation -e .")

    use_cuda = _use_cuda(torch, cpp_extension)
    sources = ["csrc/python_module.cpp", "csrc/ops.cpp", *_rel("csrc/cpu/*.cpp")]
    cxx_flags = ["-O3", "-g0", "-fvisibility=hidden", TORCH_TARGET]
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", TORCH_TARGET, "-DUSE_CUDA"]
    kwargs = dict(
        name="pyobc._C",
        sources=sources,
        # headers (and the CUDA sources, so that an sdist made on a CPU machine still has them)
        depends=_rel("csrc/*.h") + _rel("csrc/*/*.h") + _rel("csrc/cuda/*.cuh")
        + _rel("csrc/cuda/*.cu"),
        py_limited_api=True,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-Wl,--no-as-needed"],
    )
    if use_cuda:
        kwargs["sources"] = sources + _rel("csrc/cuda/*.cu")
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # one wheel for every CPython >= 3.10 (the extension uses the limited API only)
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
