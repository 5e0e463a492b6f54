"""The repository's top-level folders are memcompile's sub-packages, never packages of their
own, even when the repository root is on sys.path (`python -m pytest` puts it there).

transformers imports a top-level `kernels` while probing for the HF package of that name;
before the guard this ran kernels/ops.py a second time, which redefined the memcompile ops
and freed the registered ones under memcompile's live handles (random crashes later)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, sys
import torch
import torch._library.custom_ops as custom_ops
import memcompile
registered = custom_ops.OPDEFS["memcompile::bag"]
kernels = importlib.import_module("kernels")  # what transformers' package probe does
assert kernels.__all__ == [], kernels.__all__
assert "kernels.ops" not in sys.modules, "kernels/ops.py ran a second time"
assert custom_ops.OPDEFS["memcompile::bag"] is registered, "memcompile::bag was redefined"
for name in ("runtime", "passes"):
    try:
        importlib.import_module(name)
    except ImportError as error:
        assert "import memcompile" in str(error), error
    else:
        raise AssertionError(name + " imported as a top-level package")
values, picks = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 16, (3, 2))
weights = torch.rand(3, 2, dtype=torch.float64)
expected = (values[picks] * weights[..., None]).sum(1)
assert torch.allclose(memcompile.kernels.ops.bag(values, picks, weights), expected)
print("ok")
"""


def test_top_level_folders_do_not_import_as_packages_of_their_own():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
