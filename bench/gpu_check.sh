#!/usr/bin/env bash
# GPU readiness in one script: build the CUDA kernels against the torch found here, run the CUDA
# tests (compute-sanitizer on the kernel tests when present), measure the ops' bandwidth against a
# device copy and the scoring cost on ResNet-50 / ViT-B/16, prune to 50% of the MACs, and write
# bench/RESULTS-gpu.md. Under 8 minutes on an H100/H200 including the build.
#
#   bash bench/gpu_check.sh             # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --dry-run   # every step that needs no GPU, on CPU with small shapes (CI)
#
# torch-pruning is needed and the GPU machine may have no internet: carry the wheel in .whl/
# (`pip download --no-deps torch-pruning==1.6.1 -d .whl` on a machine that has it); it is installed
# with `pip install --no-index --no-deps --target build/gpu/site` and put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
work=build/gpu
mkdir -p "$work"
if (( dry )); then
  # one thread: the dry run checks that every step works, its timings mean nothing (and CI shares cores)
  output="$work/RESULTS-gpu-dry-run.md"; device=cpu; small=(--small --reps 1 --batches 2); export OMP_NUM_THREADS=1
else output=bench/RESULTS-gpu.md; device=cuda; small=(); fi
log="$work/log.txt"
: >"$log"
t0=$SECONDS
step() { printf '\n==== [%3d s] %s ====\n' "$((SECONDS - t0))" "$*" | tee -a "$log"; }
summary=()

step "environment"
python - <<'PY' | tee -a "$log"
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY
if (( !dry )); then
  python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "no CUDA device visible: run with --dry-run on CPU" >&2; exit 1; }
fi

step "torch-pruning"
if ! python -c 'import torch_pruning' 2>/dev/null; then
  wheels=(.whl/torch_pruning-*.whl)
  [[ -e "${wheels[0]}" ]] || { echo "torch_pruning is not installed and no wheel in .whl/ (pip download --no-deps torch-pruning==1.6.1 -d .whl)" >&2; exit 1; }
  pip install --quiet --no-index --no-deps --target "$work/site" "${wheels[@]}"
  export PYTHONPATH="$PWD/$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c 'import torch_pruning; print("torch_pruning", torch_pruning.__version__, "from", torch_pruning.__file__)'

step "build the extension in place"
if (( dry )); then
  echo "dry run: the existing build serves (on a GPU machine: PYOBC_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<capability> pip install --no-build-isolation --no-deps -e .)"
else
  arch=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
  echo "TORCH_CUDA_ARCH_LIST=$arch"
  PYOBC_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -20
fi
python - "$device" <<'PY' | tee -a "$log"
import sys
import pyobc.ops as ops
report = ops.backend_report()
key = sys.argv[1]
assert report["extension"]["status"] == "loaded", report["extension"]
missing = {k: v[key] for k, v in report["ops"].items() if v[key] != "compiled"}
assert not missing, f"ops without a compiled {key} kernel: {missing}"
print(f"pyobc._C loaded from {report['extension']['path']}; every op compiled for {key}: {', '.join(report['ops'])}")
PY

step "op tests"
if (( dry )); then
  # a few: CI's pytest runs them all; this checks the step itself
  tests=("tests/test_ops.py::test_opcheck[0]" "tests/test_ops.py::test_opcheck[9]" tests/test_ops.py::test_opcheck_sample_count
         tests/test_ops.py::test_conv_input_only_skips_the_weight_term_of_double_backward
         tests/test_conv2d_sq_grad_sums.py::test_direct_op_call_checks_in_cpp)
else
  tests=(tests/test_ops.py tests/test_ops_properties.py tests/test_conv2d_sq_grad_sums.py)
fi
python -m pytest -q -p no:cacheprovider -x "${tests[@]}" 2>&1 | tail -5 | tee -a "$log"
summary+=("op tests: $(tail -1 "$log")")

step "compute-sanitizer on the CUDA kernel tests"
if (( !dry )) && command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider -x tests/test_ops.py tests/test_conv2d_sq_grad_sums.py -k cuda 2>&1 \
      | tail -5 | tee -a "$log"
  summary+=("compute-sanitizer memcheck: $(tail -1 "$log")")
else
  echo "skipped (dry run, or compute-sanitizer not on PATH)" | tee -a "$log"
fi

step "op bandwidth"
python bench/gpu_check.py ops --device "$device" "${small[@]}" --json "$work/ops.json" | tee -a "$log"

step "scoring cost and pruning speed-up"
python bench/gpu_check.py scoring --device "$device" "${small[@]}" --json "$work/scoring.json" 2>&1 \
  | grep -v "Warning\|attn_output\|run_backward" | tee -a "$log"

step "report"
header="$(date -u +%Y-%m-%d), $(python -c 'import torch; print("torch", torch.__version__)'), \`bash bench/gpu_check.sh$( (( dry )) && echo ' --dry-run')\`, $((SECONDS - t0)) s up to the report. ${summary[*]}"
python bench/gpu_check.py report --json "$work/ops.json" "$work/scoring.json" --output "$output" --header "$header"
step "summary"
cat "$output"
echo "done in $((SECONDS - t0)) s; full log: $log"
