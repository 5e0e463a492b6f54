#!/usr/bin/env bash
# One GPU session: CUDA correctness of the kernels and their benchmark (under 5 minutes),
# then the inference benchmark and the CUDA tests (under 10 minutes in all).
# Results go to $OUT (the device tool's output folder) or benchmarks/results.
# The device machine has torch and triton but no network: memcompile is not pip-installed
# there, its package layout (passes/, kernels/, runtime/ inside memcompile) is assembled
# in a temporary folder put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
pkg="$(mktemp -d)"
cp -r memcompile "$pkg/memcompile"
for sub in passes kernels runtime; do cp -r "$sub" "$pkg/memcompile/$sub"; done
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
# Each step reports and the next one still runs: one failure must not end a short GPU session.
# Each has a time limit; together they fit the device tool's 600 s a call. The JSON of a step
# that runs out of time is lost, its printed lines are in $out.
python_step() {  # python_step SECONDS LOG SCRIPT ARGS...
  local limit="$1" log="$2"; shift 2
  timeout "$limit" python "$@" 2>&1 | tee "$out/$log" \
    || echo "$1 failed or ran past ${limit} s (see $log)"
}
python_step 100 kernel_check.txt benchmarks/kernel_check.py --json "$out/kernel_check.json"
python_step 190 bench_kernels.md benchmarks/bench_kernels.py --out "$out"
# Issue 8: per-layer latency (eager and CUDA graph), host- vs device-resident values.
python_step 120 bench_inference.md benchmarks/bench_inference.py --skip-cpu --out "$out"
# The CUDA side of the tests: Triton kernels natively (bf16 included) and a converted LM
# decoding under torch.compile(mode="reduce-overhead"). Run from outside the repository so
# the assembled package, not the bare memcompile/ folder, is imported.
repo="$(pwd)"
(cd /tmp && timeout 130 python -m pytest -q -p no:cacheprovider \
  "$repo/tests/test_triton_kernels.py" "$repo/tests/test_generate_compiled.py") 2>&1 \
  | tee "$out/gpu_tests.txt" || echo "GPU tests failed or ran out of time (see gpu_tests.txt)"
