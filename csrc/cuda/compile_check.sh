#!/usr/bin/env bash
# Compile-check of the CUDA kernels on a machine without a GPU (and without a CUDA build of torch):
# runs `nvcc -c` on every csrc/cuda/*.cu with the installed torch's headers and the flags the real
# CUDAExtension build uses (torch's COMMON_NVCC_FLAGS, C++17, -fPIC, the stable-ABI target, USE_CUDA).
# Catches compile errors in device and host code; it cannot catch runtime bugs.
#
#   csrc/cuda/compile_check.sh                 # sm_90
#   NVCC_ARCH="-gencode arch=compute_80,code=sm_80" csrc/cuda/compile_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python}
NVCC_ARCH=${NVCC_ARCH:-"-gencode arch=compute_90,code=sm_90"}
TORCH_TARGET="-DTORCH_TARGET_VERSION=0x020a000000000000"  # keep in sync with setup.py

mapfile -t TORCH_FLAGS < <("$PYTHON" -c '
from torch.utils import cpp_extension as c
for d in c.include_paths(): print("-I" + d)
for f in c.COMMON_NVCC_FLAGS: print(f)')

shopt -s nullglob
sources=(${CHECK_SOURCES:-csrc/cuda/*.cu})
if [ ${#sources[@]} -eq 0 ]; then
  echo "no csrc/cuda/*.cu files"; exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in "${sources[@]}"; do
  echo "nvcc -c $src"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$NVCC" -c "$src" -o "$out/$(basename "$src").o" \
    "${TORCH_FLAGS[@]}" -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC $NVCC_ARCH \
    -DUSE_CUDA "$TORCH_TARGET" -O3 -Icsrc
  echo "  ok ($(( $(date +%s) - start )) s)"
done
