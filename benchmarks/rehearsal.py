"""Rehearse a GPU session on the CPU, before spending a lease on it.

Runs the Python steps of `gpu_check.sh --sweep --decode-sweep --profile-rows`
(kernel_check.py, bench_kernels.py with every section, bench_inference.py with its sweeps,
profile_row_pass.py without Nsight Compute) as a GPU run would, but on CPU tensors:
Triton's interpreter runs the kernels (TRITON_INTERPRET=1), installed as the ops' CPU
implementations, at the tiny shapes of gpu_shapes.py (MEMCOMPILE_REHEARSAL=1). Every
branch of the scripts runs, every block shape of the sweeps is launched and compared with
the default's result; times are one call's wall time, not measurements. What it cannot
catch: a kernel that fails to compile for a GPU (compile_check.py does that) and anything
that needs CUDA itself (graphs, the profiler, the L2 window, programmatic dependent
launch).

    python benchmarks/rehearsal.py [--out DIR]

Prints the rows that report a failure (gpu_timing.problems) and exits 1 if there is one or
a script failed; the scripts' JSON and logs go to DIR (default: a temporary folder). The
scripts run side by side: about 2 minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_timing import problems_in

HERE = Path(__file__).resolve().parent
# (script, its arguments, the JSON it writes: None for a script whose exit status says all)
STEPS = [
    ("kernel_check.py", ["--json", "{out}/kernel_check.json"], "kernel_check.json"),
    ("bench_kernels.py", ["--sections", "sweep,kernels,values", "--configs", "tiny",
                          "--out", "{out}"], "kernels.json"),
    ("bench_inference.py", ["--skip-cpu", "--decode-sweep", "--out", "{out}"], "inference.json"),
    ("profile_row_pass.py", [], None),  # gpu_check.sh --profile-rows, without Nsight
]  # fmt: skip


def rehearse(out: Path) -> list[str]:
    """Run the steps into `out`, side by side (each is one process on one core); the
    failures found, one line each."""
    env = os.environ | {"TRITON_INTERPRET": "1", "MEMCOMPILE_REHEARSAL": "1"}
    began = time.perf_counter()
    running = []
    for script, args, _ in STEPS:  # each prints to its own log: no pipe to fill
        with open(out / f"{script}.log", "w") as log:
            command = [sys.executable, str(HERE / script), *(a.format(out=out) for a in args)]
            running.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=HERE))  # fmt: skip
    failures = []
    for (script, _, written), process in zip(STEPS, running):
        process.wait()
        print(f"{script}: exit {process.returncode}, done after "
              f"{time.perf_counter() - began:.0f} s", file=sys.stderr)  # fmt: skip
        if process.returncode != 0:
            last = (out / f"{script}.log").read_text().strip().splitlines()[-1:]
            failures.append(f"{script} exited {process.returncode}: {' '.join(last)}")
        if written is not None and not (out / written).exists():
            failures.append(f"{script} wrote no {written}")
    return failures + problems_in(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        failures = rehearse(out)
    for line in failures:
        print(line)
    print(f"rehearsal: {len(failures)} failure(s)" if failures else "rehearsal: no failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
