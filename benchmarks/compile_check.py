"""Compile every Triton kernel variant the GPU runs launch, for an H100, without a GPU.

The launchers in kernels/triton_*.py run on meta tensors at the shapes of the benchmarks
and of kernel_check.py; each kernel launch is recorded instead of run. Each distinct
variant (kernel, argument types, constexprs, warps) is then compiled for sm_90 by the
installed Triton; cuobjdump reads registers and stack bytes (spills) per thread off it.
The check fails (exit 1) when a variant does not compile or needs more shared memory than
an H100 block may have (227 KB): found here that costs seconds, found in a GPU session it
costs minutes of a short lease. Spills are reported, not failed. The numbers are those of
the installed Triton; the GPU machine's may differ (Triton 3.6 spilled where 3.9 did not).

    python benchmarks/compile_check.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile
from triton.runtime.jit import JITFunction

from memcompile.kernels import triton_bag, triton_topk, triton_update

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # the opt-in maximum of one block
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}  # fmt: skip


def record_launches(launch) -> list[tuple]:
    """Run `launch()` with every Triton kernel launch recorded, not run: a list of
    (kernel, {argument: type}, {constexpr: value}, {option: value})."""
    seen = []

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
        constexprs = {self.arg_names[i]: bound[self.arg_names[i]] for i in self.constexprs}
        types = {name: _type_of(value) for name, value in bound.items() if name not in constexprs}
        options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        seen.append((self, types, constexprs, options))

    real = JITFunction.run
    JITFunction.run = run
    try:
        launch()
    finally:
        JITFunction.run = real
    return seen


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_variant(kernel, types, constexprs, options) -> dict:
    signature = {name: ("constexpr" if name in constexprs else types[name])
                 for name in kernel.arg_names}  # fmt: skip
    row = {"kernel": kernel.__name__, "constexprs": constexprs, "options": options}
    start = time.perf_counter()
    try:
        compiled = triton_compile(ASTSource(kernel, signature, constexprs), target=H100,
                                  options=options)  # fmt: skip
    except Exception as error:  # a variant that cannot compile is the finding
        return row | {"error": f"{type(error).__name__}: {str(error)[:500]}"}
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["shared_bytes"] = compiled.metadata.shared
    row.update(_resource_usage(compiled.asm["cubin"]))
    return row


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes (spills and local arrays) per thread, read off the cubin
    by the cuobjdump bundled with Triton."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([str(cuobjdump), "-res-usage", str(path)],
                              capture_output=True, text=True)  # fmt: skip
    usage = dict(re.findall(r"(REG|STACK):(\d+)", done.stdout))
    return {"registers": int(usage.get("REG", -1)), "stack_bytes": int(usage.get("STACK", -1))}


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(quick: bool) -> list:
    """The launches of the GPU runs: bench_kernels (small and 1.3B-like, heads 4, knn 32,
    k_dim 512), bench_inference (decode and prefill at d_model 2048), kernel_check."""
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    heads, knn, half = 4, 32, 256
    bags = [(16384, 1024**2, 2048), (8192, 512**2, 1024)]
    if not quick:
        bags += [(1, 1024**2, 2048), (8, 1024**2, 2048), (64, 1024**2, 2048), (1000, 4096, 320)]
    tokens = [1, 16384] if quick else [1, 8, 64, 777, 4096, 16384]
    found = []
    for dtype in dtypes:
        for n, rows, v_dim in bags:
            values, grad = meta(rows, v_dim, dtype=dtype), meta(n, v_dim, dtype=dtype)
            indices, weights = meta(n, heads * knn, dtype=torch.int64), meta(n, heads * knn)
            found += record_launches(partial(triton_bag.bag_forward, values, indices, weights))
            if n > 64:
                backward = partial(triton_bag.bag_backward, grad, values, indices, weights)
                found += record_launches(backward)
        for n in tokens:
            q = meta(n, heads, 2 * half, dtype=dtype)
            keys = meta(heads, 2, 1024, half, dtype=dtype)
            for softmax in (False, True):
                found += record_launches(partial(triton_topk.pk_topk, q, keys, knn, softmax))
        found += update_launches(dtype)
    return found


def update_launches(dtype: torch.dtype) -> list:
    n, rows, v_dim, picks = 16384, 1024**2, 2048, 128
    values, grad = meta(rows, v_dim, dtype=dtype), meta(n, v_dim, dtype=dtype)
    indices, weights = meta(n, picks, dtype=torch.int64), meta(n, picks)
    state = meta(rows, v_dim)
    found = record_launches(partial(triton_update.bag_weight_grad, grad, values, indices))
    found += record_launches(partial(triton_update.row_grad_sq, values, indices, weights, grad))
    for optimizer in ("adam", "rowwise_adagrad"):
        update = partial(
            triton_update.fused_row_update, values, state, state, indices, weights, grad, None,
            None, optimizer, 1e-3, 1e-8, 0.9, 0.999, 0.0, v_dim, 1, 0, dtype == torch.bfloat16,
            True,
        )  # fmt: skip
        found += record_launches(update)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 at the benchmark sizes only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = {}
    for kernel, types, constexprs, options in launches(args.quick):
        key = (kernel.__name__, tuple(sorted(types.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))  # fmt: skip
        variants.setdefault(key, (kernel, types, constexprs, options))
    rows, failed = [], False
    for kernel, types, constexprs, options in variants.values():
        row = compile_variant(kernel, types, constexprs, options)
        row["types"] = types
        row["ok"] = "error" not in row and row["shared_bytes"] <= H100_SHARED_BYTES
        failed |= not row["ok"]
        rows.append(row)
        shown = row.get("error") or (
            f"shared {row['shared_bytes'] / 1024:.0f} KB, {row['registers']} registers, "
            f"{row['stack_bytes']} B stack"
        )
        consts = " ".join(f"{k}={v}" for k, v in constexprs.items())
        data = next(t for t in types.values() if t.startswith("*fp") or t.startswith("*bf"))
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['kernel']} {data} [{consts}] {shown}",
              flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__,
                                         "variants": rows}, indent=2) + "\n")  # fmt: skip
    print(f"{len(rows)} variants, {sum(not r['ok'] for r in rows)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
