#!/usr/bin/env bash
# One GPU session: the CUDA tests beside the kernels' correctness check (float64
# references), then the kernel benchmark and the inference benchmark, alone on the GPU.
# `gpu_check.sh --sweep` also times each kernel's block shapes (bench_kernels.py's sweep
# section), to set the defaults from: 227 and 278 s on an H100 (fourth and fifth runs).
# Results go to $OUT (the device tool's output folder) or benchmarks/results:
# gpu_log.txt (everything printed), gpu_tests.txt, gpu_compiled*.txt, kernel_check.json,
# kernels.json and inference.json. The log ends with every row of those that reports a
# failure, and their count ("problems: none" when there is none).
# The device machine has torch and triton but no network: memcompile is not pip-installed
# there, its package layout (passes/, kernels/, runtime/ inside memcompile) is assembled
# in a temporary folder put on PYTHONPATH.
# `--sweep-rows` sweeps the row pass's shapes only; `--no-inference` leaves out
# bench_inference.py (for a short last run of a lease, when nothing it times has changed);
# BENCH_CONFIGS=1.3B times that config alone; `--profile-rows` ends with Nsight Compute's
# counters of the row pass's kernels (profile_row_pass.py; ncu_rows.txt). `--no-kernels`
# leaves out bench_kernels.py (a run for issue 8 alone); `--decode-sweep` times a decode
# lookup under each top-k shape and the decode projections under each block shape
# (bench_inference.py --decode-sweep). `--no-checks` leaves out the CUDA tests and
# kernel_check.py (a second call on a machine where a first one just ran them on the same
# code: about 150 s saved).
# Before a lease: `python benchmarks/rehearsal.py` runs this session's Python steps on the
# CPU (Triton's interpreter, tiny shapes), every sweep shape against the default's result.
set -euo pipefail
sections=kernels,values
inference=yes
kernels=yes
decode_sweep=""
inference_limit=180
profile=no
checks=yes
for option in "$@"; do
  case "$option" in
    --sweep) sections=sweep,kernels,values ;;
    --sweep-rows) sections=sweep-rows,kernels,values ;;
    --no-inference) inference=no ;;
    --no-kernels) kernels=no ;;
    --decode-sweep) decode_sweep=--decode-sweep; inference_limit=300 ;;
    --profile-rows) profile=yes ;;
    --no-checks) checks=no ;;
    *) echo "usage: benchmarks/gpu_check.sh [--sweep | --sweep-rows] [--no-inference]" \
            "[--no-kernels] [--decode-sweep] [--profile-rows] [--no-checks]" >&2
       exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi > /dev/null 2>&1; then
  echo "error: gpu_check.sh needs a CUDA GPU and nvidia-smi (benchmarks/rehearsal.py runs" \
       "its Python steps on the CPU)" >&2
  exit 2
fi
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
log="$out/gpu_log.txt"
pkg="$(mktemp -d)"
trap 'rm -rf "$pkg"' EXIT
cp -r memcompile "$pkg/memcompile"
for sub in passes kernels runtime; do cp -r "$sub" "$pkg/memcompile/$sub"; done
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$log"
# Each step reports and the next one still runs: one failure must not end a short GPU session.
# Each has a time limit; together they fit the device tool's 600 s a call (with --sweep).
python_step() {  # python_step SECONDS SCRIPT ARGS...
  local limit="$1"; shift
  timeout "$limit" python3 "$@" 2>&1 | tee -a "$log" \
    || echo "$1 failed or ran past ${limit} s" | tee -a "$log"
}
# The CUDA side of the tests, beside kernel_check (none of them times anything): the Triton
# kernel cases natively, in pytest workers so Triton compiles on several cores; and a
# converted LM decoding under torch.compile(mode="reduce-overhead"), in a process of its
# own, twice: its earlier, hand-compiled form crashed in Inductor's static CUDA launcher
# on the first H100 (torch 2.11, GPU_NOTES.md), so it also runs with that launcher off.
# Run from outside the repository
# so the assembled package, not the bare memcompile/ folder, is imported.
repo="$(pwd)"
in_tmp_pytest() {  # in_tmp_pytest LOG TESTS...
  local log_file="$out/$1"; shift
  (cd /tmp && timeout 170 python3 -m pytest -q -rf --tb=short -p no:cacheprovider "$@") \
    > "$log_file" 2>&1
}
if [ "$checks" = yes ]; then
  in_tmp_pytest gpu_tests.txt -n 8 "$repo/tests/triton_cases.py" \
    "$repo/tests/triton_update_cases.py" &
  cases=$!
  in_tmp_pytest gpu_compiled.txt "$repo/tests/test_generate_compiled.py" &
  compiled=$!
  TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER=0 in_tmp_pytest gpu_compiled_no_static_launcher.txt \
    "$repo/tests/test_generate_compiled.py" &
  no_static=$!
  python_step 150 benchmarks/kernel_check.py --json "$out/kernel_check.json"
  for job in "$cases:gpu_tests.txt" "$compiled:gpu_compiled.txt" \
             "$no_static:gpu_compiled_no_static_launcher.txt"; do
    wait "${job%%:*}" || echo "failed or out of time: ${job#*:}" | tee -a "$log"
    tail -n 4 "$out/${job#*:}" | tee -a "$log"
  done
fi
if [ "$kernels" = yes ]; then
  python_step 260 benchmarks/bench_kernels.py --sections "$sections" \
    --configs "${BENCH_CONFIGS:-1.3B,small}" --out "$out"
fi
# Issue 8: per-layer latency (eager and CUDA graph), host- vs device-resident values.
if [ "$inference" = yes ]; then
  python_step "$inference_limit" benchmarks/bench_inference.py --skip-cpu --out "$out" \
    $decode_sweep
fi
# The row pass's counters: what its next change should start from (GPU_NOTES.md, run 6).
if [ "$profile" = yes ]; then
  timeout 240 ncu --profile-from-start off --clock-control none -k regex:_rows_kernel \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy python3 benchmarks/profile_row_pass.py > "$out/ncu_rows.txt" 2>&1 \
    || echo "ncu failed or ran past 240 s (ncu_rows.txt)" | tee -a "$log"
  tail -n 40 "$out/ncu_rows.txt" | tee -a "$log"
fi
# Last, where the device tool's output tail shows it: every row that reports a failure.
python3 benchmarks/gpu_timing.py "$out" 2>&1 | tee -a "$log" \
  || echo "listing the failing rows failed" | tee -a "$log"
