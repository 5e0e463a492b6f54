"""benchmarks/gpu_check.sh, the script a GPU lease runs: each option runs the steps it
says and no others, with the arguments and output folder it says, and every run ends by
listing the rows that report a failure (gpu_timing.py). python3, nvidia-smi and
ncu are replaced by stubs that record how they were called (the scripts they run are
checked by tests/test_rehearsal.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $* | static_launcher=${TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER:-}" \\
  >> "$STUB_LOG"
"""


def run_gpu_check(tmp_path: Path, *options: str, **env: str) -> tuple[int, list[str], str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("python3", "nvidia-smi", "ncu"):
        stub = stubs / name
        stub.write_text(STUB)
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    log, out = tmp_path / "calls.txt", tmp_path / "out"
    environment = os.environ | env | {"PATH": f"{stubs}:{os.environ['PATH']}",
                                      "STUB_LOG": str(log), "OUT": str(out)}  # fmt: skip
    done = subprocess.run(["bash", str(SCRIPT), *options], capture_output=True, text=True,
                          env=environment)  # fmt: skip
    calls = log.read_text().splitlines() if log.exists() else []
    return done.returncode, [c for c in calls if not c.startswith("nvidia-smi")], done.stderr


def scripts(calls: list[str]) -> list[str]:
    """The benchmark scripts and test files called, in order, by file name."""
    found = []
    for call in calls:
        words = call.split(" | ")[0].split()
        found += [Path(w).name for w in words if w.endswith((".py", ".sh"))]
    return found


def test_a_plain_run_checks_then_times_the_kernels_and_inference(tmp_path):
    rc, calls, err = run_gpu_check(tmp_path)
    assert rc == 0, err
    assert sorted(scripts(calls)[:5]) == sorted([
        "triton_cases.py", "triton_update_cases.py", "test_generate_compiled.py",
        "test_generate_compiled.py", "kernel_check.py"])  # fmt: skip
    assert scripts(calls)[5:] == ["bench_kernels.py", "bench_inference.py", "gpu_timing.py"]
    compiled = [c for c in calls if "test_generate_compiled.py" in c]
    assert sorted(c.split("static_launcher=")[1] for c in compiled) == ["", "0"]
    assert any("-n 8" in c for c in calls if "triton_cases.py" in c)
    kernels = next(c for c in calls if "bench_kernels.py" in c)
    assert "--sections kernels,values" in kernels and "--configs 1.3B,small" in kernels
    assert f"--out {tmp_path / 'out'}" in kernels
    inference = next(c for c in calls if "bench_inference.py" in c)
    assert "--skip-cpu" in inference and "--decode-sweep" not in inference
    assert not any(c.startswith("ncu") for c in calls)


def test_a_row_pass_sweep_of_one_config_without_inference(tmp_path):
    rc, calls, err = run_gpu_check(tmp_path, "--sweep-rows", "--no-inference",
                                   BENCH_CONFIGS="1.3B")  # fmt: skip
    assert rc == 0, err
    assert scripts(calls)[5:] == ["bench_kernels.py", "gpu_timing.py"]
    kernels = next(c for c in calls if "bench_kernels.py" in c)
    assert "--sections sweep-rows,kernels,values" in kernels and "--configs 1.3B " in kernels


def test_a_second_call_on_a_warm_machine_for_the_decode_path_alone(tmp_path):
    rc, calls, err = run_gpu_check(tmp_path, "--no-checks", "--no-kernels", "--decode-sweep")
    assert rc == 0, err
    assert scripts(calls) == ["bench_inference.py", "gpu_timing.py"]
    assert "--decode-sweep" in calls[0] and "--skip-cpu" in calls[0]


def test_the_row_pass_counters_alone(tmp_path):
    rc, calls, err = run_gpu_check(
        tmp_path, "--no-checks", "--no-kernels", "--no-inference", "--profile-rows"
    )
    assert rc == 0, err
    assert calls[0].startswith("ncu ") and "-k regex:_rows_kernel" in calls[0]
    assert scripts(calls) == ["profile_row_pass.py", "gpu_timing.py"]
    assert (tmp_path / "out" / "ncu_rows.txt").exists()


def test_the_package_copy_goes_when_the_run_ends(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    rc, calls, _ = run_gpu_check(tmp_path, "--no-checks", "--no-kernels", TMPDIR=str(temporary))
    assert rc == 0 and calls and list(temporary.iterdir()) == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine's own PATH")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    env = os.environ | {"OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.startswith("error: gpu_check.sh needs a CUDA GPU")
    assert len(done.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--bogus", "--no-check"])
def test_an_unknown_option_stops_before_anything_runs(tmp_path, option):
    rc, calls, err = run_gpu_check(tmp_path, option)
    assert rc == 2 and "usage: benchmarks/gpu_check.sh" in err
    assert calls == [] and not (tmp_path / "out").exists()


def test_the_last_step_lists_the_rows_that_report_a_failure(tmp_path):
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": [
        {"what": "bag fwd", "ms": 2.9}, {"what": "sweep", "shape": "a", "error": "OutOfResources"},
        {"what": "sweep", "shape": "b", "ms": 1.0, "same_result": False},
        {"what": "check", "ok": True}, {"what": "layer", "not_built": ["bag bfloat16"]}]}))
    checks = {"checks": [{"op": "bag", "ok": False}]}
    (tmp_path / "kernel_check.json").write_text(json.dumps(checks))
    (tmp_path / "inference.json").write_text('{"layers": [{"tokens": 1')  # cut off by timeout
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("gpu_timing.py")), str(tmp_path)],
                          capture_output=True, text=True)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines[-1] == "problems: 5", done.stderr
    assert sum(line.startswith("kernels.json: ") for line in lines) == 3
    assert any(line.startswith("kernel_check.json: ") for line in lines)
    assert any(line.startswith("inference.json: unreadable") for line in lines)
