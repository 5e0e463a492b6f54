"""Runs the Triton kernel cases (tests/triton_cases.py) in their own pytest process, with
Triton's interpreter on where there is no GPU (see that file)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch


def test_triton_kernels_match_the_reference():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cases = Path(__file__).with_name("triton_cases.py")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        capture_output=True, text=True, env=env, cwd=cases.parent.parent,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 30 and "skipped" not in summary, summary
