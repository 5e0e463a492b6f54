"""Runs the Triton kernel cases in their own pytest process, with Triton's interpreter on
where there is no GPU: tests/triton_cases.py (bag, top-k) and tests/triton_update_cases.py
(fused value updates). The interpreter patches Triton at import, so it never runs inside
the main test process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize(
    "cases, minimum", [("triton_cases.py", 40), ("triton_update_cases.py", 28)]
)
def test_triton_kernels_match_the_reference(cases, minimum):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    path = Path(__file__).with_name(cases)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
        # cwd tests/: from the repository root, `-m pytest` would import the bare memcompile/
        # folder (without passes/, kernels/, runtime/) ahead of the installed package.
        capture_output=True, text=True, env=env, cwd=path.parent,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= minimum and "skipped" not in summary, summary
