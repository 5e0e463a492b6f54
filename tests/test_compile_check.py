"""benchmarks/compile_check.py: every Triton kernel variant of the GPU runs compiles for an
H100 (sm_90) on this CPU machine and fits its shared memory; a variant that does not fit is
reported as failing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
KERNELS = {
    "_bag_forward_kernel", "_short_rows_kernel", "_long_rows_kernel", "_split_topk_kernel",
    "_merge_splits_kernel",
    "_weight_grad_kernel", "_linears_kernel", "_sub_key_grad_kernel", "_silu_gate_kernel",
    "_silu_gate_backward_kernel",
}  # fmt: skip


def test_every_variant_of_the_gpu_runs_compiles_for_sm90_and_fits(tmp_path):
    # --quick: the benchmarks' bf16 launches (training and inference sizes); the full check
    # (kernel_check's shapes in every dtype too) takes minutes on two cores without a cache.
    out = tmp_path / "compile.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "compile_check.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert {v["kernel"] for v in variants} == KERNELS
    for v in variants:
        assert v["ok"] and 0 < v["registers"] <= 255, v
        assert v["shared_bytes"] <= 232448, v
    # The decode and training shapes pick different tiles: both were compiled.
    forward_tiles = {
        v["constexprs"]["BLOCK_V"] for v in variants if v["kernel"] == "_bag_forward_kernel"
    }
    assert {64, 1024, 2048} <= forward_tiles  # decode; whole rows of both training configs
    gated = {v["constexprs"]["GATED"] for v in variants if v["kernel"] == "_bag_forward_kernel"}
    assert gated == {False, True}  # training, and inference with the Memory+ gating


def test_a_variant_over_the_shared_memory_limit_fails_the_check():
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compile_check

        from memcompile.kernels import triton_topk
        from memcompile.kernels.triton_options import COMPILE_OPTIONS
    finally:
        sys.path.remove(str(BENCHMARKS))
    # fp32 sub-keys 512 wide in steps of 128 rows: 256 KB a step, pipelined. The launcher
    # never picks this (triton_topk.supports); launched by hand it would not fit.
    q, keys = torch.empty(64, 4, 1024, device="meta"), torch.empty(4, 2, 1024, 512, device="meta")
    partial = torch.empty(64, 4, 2, 1, 32, dtype=torch.int64, device="meta")
    constexprs = dict(HALF=512, HALF_P=512, BLOCK_N=16, BLOCK_K=128, K=32, LOG_K=5, SPLITS=1,
                      PRECISION="ieee", PDL=False, **COMPILE_OPTIONS)  # fmt: skip
    args = (q, keys, partial, 64, 4, 1024, 1024)
    kernel = triton_topk._split_topk_kernel
    row = compile_check.check_variant(kernel, *compile_check.bind(kernel, args, constexprs))
    assert not row["ok"] and row["shared_bytes"] > compile_check.H100_SHARED_BYTES, row
    assert not triton_topk.supports(512, 64, 4) and triton_topk.supports(256, 64, 4)
