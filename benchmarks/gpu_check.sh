#!/usr/bin/env bash
# One GPU session, under 5 minutes: CUDA correctness of the kernels, then the benchmark.
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
python benchmarks/kernel_check.py --json "$out/kernel_check.json" \
  || echo "kernel_check.py FAILED: see the FAIL lines above"
python benchmarks/bench_kernels.py --out "$out" | tee "$out/bench_kernels.md" \
  || echo "bench_kernels.py failed"
# Issue 8: per-layer latency (eager and CUDA graph), host- vs device-resident values.
python benchmarks/bench_inference.py --skip-cpu --out "$out" | tee "$out/bench_inference.md" \
  || echo "bench_inference.py failed (kernel results above are still valid)"
# The CUDA side of the tests: Triton kernels natively (bf16 included) and a converted LM
# decoding under torch.compile(mode="reduce-overhead"). Run from outside the repository so
# the assembled package, not the bare memcompile/ folder, is imported.
repo="$(pwd)"
(cd /tmp && timeout 300 python -m pytest -q -p no:cacheprovider \
  "$repo/tests/test_triton_kernels.py" "$repo/tests/test_generate_compiled.py") \
  | tee "$out/gpu_tests.txt" || echo "GPU tests failed (see gpu_tests.txt)"
