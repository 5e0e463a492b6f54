"""benchmarks/rehearsal.py: a GPU session's scripts (kernel_check, bench_kernels with every
section, bench_inference with its sweeps) run on the CPU under Triton's interpreter with no
failing row, every row a GPU run would write is there, and every block shape of the sweeps
computed what the default shape computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_a_gpu_session_rehearsed_on_the_cpu_writes_every_row_and_every_shape_agrees(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "rehearsal.py"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_inference import DECODE_SCAN_VARIANTS, LINEAR_VARIANTS
        from kernel_sweep import FORWARD_VARIANTS, ROW_PASS_VARIANTS, SCAN_VARIANTS
    finally:
        sys.path.remove(str(BENCHMARKS))

    checks = json.loads((tmp_path / "kernel_check.json").read_text())["checks"]
    assert checks and all(c["ok"] for c in checks)

    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    timed = {(r["what"], r["impl"]) for r in rows if "ms" in r}
    for what in ("bag fwd", "bag fwd+bwd", "pk_topk fwd", "pk_topk bwd", "gating fwd+bwd"):
        assert len([w for w, _ in timed if w == what]) >= 2, what  # ours beside a baseline
    for what in ("Memory+ layer fwd+bwd", "dense SwiGLU FFN fwd+bwd", "pk_topk fwd+bwd"):
        assert any(w == what for w, _ in timed), what
    for table in ("float16", "float32"):
        step = [i for w, i in timed if w == f"values step (fwd+bwd+update), {table} table"]
        assert len(step) == 3, step  # unfused, fused Adagrad, fused Adam
    fused_checks = [r for r in rows if r["what"].startswith("fused update")]
    assert len(fused_checks) == 4 and all(r["ok"] for r in fused_checks)
    swept = {
        "bag fwd": FORWARD_VARIANTS, "bag bwd": ROW_PASS_VARIANTS, "pk_topk fwd": SCAN_VARIANTS,
        "values step, fused rowwise_adagrad": ROW_PASS_VARIANTS,
        "bag bwd, Zipf s=0.8 rows": ROW_PASS_VARIANTS,
    }  # fmt: skip
    for case, variants in swept.items():
        shapes = [r for r in rows if r["what"] == f"sweep {case}"]
        assert len(shapes) == 1 + len(variants), case  # each shape ran, none failed
        assert shapes[0]["impl"] == "default", case  # the kernels' own choice, first
        assert all(r["same_result"] for r in shapes), case
        assert any(r["what"] == f"sweep {case}: fastest" for r in rows), case

    inference = json.loads((tmp_path / "inference.json").read_text())
    modes = {r["mode"] for r in inference["layers"]}
    assert {"eager", "cuda graph", "cuda graph, PDL off", "host-resident values, eager"} <= modes
    assert [r["model"].split()[0] for r in inference["decode"]] == ["dense", "memory"]
    assert inference["projections"]
    sweep = [r for r in inference["decode_sweep"] if not r["shape"].startswith("fastest")]
    lookups = [r for r in sweep if "tokens" in r]
    assert len(lookups) == 2 * (1 + len(DECODE_SCAN_VARIANTS))  # one and a few tokens
    assert len(sweep) - len(lookups) == 2 * (1 + len(LINEAR_VARIANTS))  # query + gate, output
    assert inference["not_built"] == []
    assert all(r["same_result"] for r in sweep)


def test_kernels_installed_for_cpu_tensors_are_the_ones_the_ops_run():
    # The rehearsal's premise: after register_cuda_kernels("cpu"), an op on CPU tensors
    # runs its Triton kernel (here, under the interpreter), not the PyTorch reference.
    code = """
import torch
from memcompile.kernels import cuda, ops, reference, triton_bag
calls = []
forward = triton_bag.bag_forward
triton_bag.bag_forward = lambda *args: calls.append(1) or forward(*args)
values, weights = torch.randn(30, 12), torch.rand(5, 4)
indices = torch.randint(0, 30, (5, 4))
before = ops.bag(values, indices, weights)
assert not calls, "the CPU default ran a Triton kernel"
assert cuda.register_cuda_kernels("cpu")
after = ops.bag(values, indices, weights)
torch.testing.assert_close(after, reference.bag(values, indices, weights))
print(len(calls))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=BENCHMARKS,
        env=os.environ | {"TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-3000:]
