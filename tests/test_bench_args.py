"""The CPU benchmarks refuse bad arguments and an output they cannot write before they run
(one line, exit 2), as the CLI does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, args, says",
    [
        ("bench_cpu_training.py", ["--tokens", "8,0"], "--tokens: '8,0': 0 must be at least 1"),
        ("bench_inference.py", ["--threads", "0"], "--threads: 0 must be at least 1"),
        ("bench_onnx.py", ["--seconds", "nan"], "--seconds: nan must be a positive"),
        ("bench_lazy_init.py", ["--out", "{file}"], "is a file, not a directory"),
        ("bench_cpu_training.py", ["--out", "{file}"], "is a file, not a directory"),
    ],
)
def test_bad_arguments_are_one_line_before_the_run(tmp_path, script, args, says):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    args = [a.format(file=blocker) for a in args]
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert says in done.stderr.strip().splitlines()[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and blocker.read_text() == "mine"
