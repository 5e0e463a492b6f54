"""Compile every Triton kernel variant the GPU runs launch, for an H100, without a GPU.

The launchers in kernels/triton_*.py run on meta tensors at the shapes of the benchmarks
and of kernel_check.py; each kernel launch is recorded instead of run. Each distinct
variant is bound as Triton binds a launch (argument types, 16-byte alignment and
divisibility, constant 1s, options) and compiled for sm_90 by the installed Triton;
cuobjdump reads registers, stack bytes (spills) per thread and the count of SASS
instructions off the binary (the top-k kernels' instruction counts guided their shapes
while no GPU was at hand; a count is not a time). The check fails (exit 1) when a
variant does not compile or needs more shared memory than an H100 block may have
(227 KB): found here that costs seconds, found in a GPU session it costs minutes of a
short lease. Spills are reported, not failed. The figures are those of the
installed Triton (the GPU machine's 3.6 spilled where 3.9 does not, and failed to compile
`tl.topk` at k = 1 where 3.9 and the interpreter do not); the binding uses Triton's own
launch helpers (`create_function_from_signature`, `JITFunction._pack_args`, Triton 3.6 to
3.9). To compile with the GPU machine's Triton:

    python -m pip install --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python benchmarks/compile_check.py

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
from gpu_shapes import (
    CHECK_BAG,
    CHECK_GATE,
    CHECK_LINEARS,
    CHECK_LOOKUP,
    CHECK_TOPK,
    DECODE_SIZES,
    HALF,
    HEADS,
    INFERENCE,
    INFERENCE_TOKENS,
    KNN,
    TRAINING,
)  # fmt: skip
from gpu_timing import hooks_restored
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as triton_compile
from triton.runtime.jit import JITFunction, create_function_from_signature

from memcompile.kernels import (
    fused_update,
    pdl,
    triton_bag,
    triton_gate,
    triton_linear,
    triton_rows,
    triton_topk,
    triton_topk_backward,
    triton_update,
)

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # the opt-in maximum of one block
H100_SMS = 132


def record_launches(launch) -> list[tuple]:
    """Run `launch()` with every Triton kernel launch recorded, not run: a list of
    (kernel, args, kwargs)."""
    seen = []

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, kwargs))

    real = JITFunction.run
    JITFunction.run = run
    try:
        launch()
    finally:
        JITFunction.run = real
    return seen


def bind(kernel: JITFunction, args, kwargs) -> tuple[ASTSource, dict]:
    """(source, options) of the binary Triton would build for this launch on an H100."""
    backend = make_backend(H100)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # absent in older Tritons
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def compile_variant(kernel: JITFunction, source: ASTSource, options: dict) -> dict:
    """Compile one bound launch (`bind`) for an H100; its resources, or the error."""
    names = [p.name for p in kernel.params]
    constexprs = {names[path[0]]: value for path, value in source.constants.items()}
    row = {"kernel": kernel.__name__, "constexprs": constexprs,
           "types": {k: v for k, v in source.signature.items() if v != "constexpr"},
           "num_warps": options["num_warps"], "num_stages": options["num_stages"]}  # fmt: skip
    start = time.perf_counter()
    try:
        compiled = triton_compile(source, target=H100, options=options)
    except Exception as error:  # a variant that cannot compile is the finding
        return row | {"error": f"{type(error).__name__}: {str(error)[:500]}"}
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["shared_bytes"] = compiled.metadata.shared
    row.update(_resource_usage(compiled.asm["cubin"]))
    return row


def check_variant(kernel: JITFunction, source: ASTSource, options: dict) -> dict:
    """compile_variant's row with `ok`: it compiled and fits an H100 block's shared memory."""
    row = compile_variant(kernel, source, options)
    row["ok"] = "error" not in row and row["shared_bytes"] <= H100_SHARED_BYTES
    return row


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes (spills and local arrays) per thread, and the count of
    SASS instructions (a static size: a proxy for the unrolled work of a loop-free kernel
    such as the top-k merge, not a time), read off the cubin by Triton's cuobjdump."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(path)],
                               capture_output=True, text=True).stdout  # fmt: skip
        sass = subprocess.run([str(cuobjdump), "-sass", str(path)],
                              capture_output=True, text=True).stdout  # fmt: skip
    found = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return {
        "registers": int(found.get("REG", -1)),
        "stack_bytes": int(found.get("STACK", -1)),
        "sass_instructions": len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass)),
    }


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def bag_launches(n, picks, rows, v_dim, dtype, backward: bool, gated: bool = False) -> list:
    values, grad = meta(rows, v_dim, dtype=dtype), meta(n, v_dim, dtype=dtype)
    indices, weights = meta(n, picks, dtype=torch.int64), meta(n, picks)
    swilu = meta(n, v_dim, dtype=dtype) if gated else None  # the Memory+ gating, inference
    found = record_launches(partial(triton_bag.bag_forward, values, indices, weights, swilu))
    if backward:
        found += record_launches(partial(triton_bag.bag_backward, grad, values, indices, weights))
    return found


def topk_launches(n, heads, n_keys, k_dim, knn, dtype, softmax: bool, backward=False) -> list:
    q, keys = meta(n, heads, k_dim, dtype=dtype), meta(heads, 2, n_keys, k_dim // 2, dtype=dtype)
    found = record_launches(partial(triton_topk.pk_topk, q, keys, knn, softmax))
    if backward:
        grad, indices = meta(n, heads, knn), meta(n, heads, knn, dtype=torch.int64)
        found += record_launches(
            partial(triton_topk_backward.pk_topk_backward, grad, q, keys, indices)
        )
    return found


def linear_launches(n, d_in, widths, dtype) -> list:
    """A memory layer's projections at n tokens: query and gate together, or the output."""
    weights = [meta(width, d_in, dtype=dtype) for width in widths]
    biases = [meta(width, dtype=dtype) for width in widths]
    return record_launches(partial(triton_linear.linears, meta(n, d_in, dtype=dtype), weights,
                                   biases))  # fmt: skip


def gate_launches(n, v_dim, dtype) -> list:
    """A training step's Memory+ gating, forward and backward."""
    x, gate = meta(n, v_dim, dtype=dtype), meta(n, v_dim, dtype=dtype)
    return record_launches(partial(triton_gate.silu_gate, x, gate)) + record_launches(
        partial(triton_gate.silu_gate_backward, gate, x, gate)
    )


def update_launches(n, rows, v_dim, picks, dtype) -> list:
    values, grad = meta(rows, v_dim, dtype=dtype), meta(n, v_dim, dtype=dtype)
    indices, weights = meta(n, picks, dtype=torch.int64), meta(n, picks)
    found = record_launches(partial(triton_update.bag_weight_grad, grad, values, indices))
    found += record_launches(partial(triton_update.row_grad_sq, values, indices, weights, grad))
    for optimizer in ("adam", "rowwise_adagrad"):
        state = meta(*fused_update.state_shapes(optimizer, (rows, v_dim))[0])
        update = partial(
            triton_update.fused_row_update, values, state, state, indices, weights, grad, None,
            None, optimizer, 1e-3, 1e-8, 0.9, 0.999, 0.0, v_dim, 1, 0, dtype == torch.bfloat16,
            True,
        )  # fmt: skip
        found += record_launches(update)
    return found


def sweep_launches() -> list:
    """The launches of bench_kernels.py's sweep (gpu_check.sh --sweep) at the 1.3B-like
    config: each block shape of the bag forward, the row pass (bag backward, fused updates)
    and the top-k scan; and of bench_inference.py's decode sweep."""
    from kernel_sweep import FORWARD_VARIANTS, ROW_PASS_VARIANTS, SCAN_VARIANTS

    c, bf16, picks = TRAINING["1.3B"], torch.bfloat16, HEADS * KNN
    rows = c["n_keys"] ** 2
    shaped = [
        (triton_bag, "forward_blocks", FORWARD_VARIANTS,
         partial(bag_launches, c["tokens"], picks, rows, c["v_dim"], bf16, backward=False)),
        (triton_rows, "pass_blocks", ROW_PASS_VARIANTS,
         lambda: bag_launches(c["tokens"], picks, rows, c["v_dim"], bf16, backward=True)
         + update_launches(c["tokens"], rows, c["v_dim"], picks, bf16)),
        (triton_topk, "scan_blocks", SCAN_VARIANTS,
         partial(topk_launches, c["tokens"], HEADS, c["n_keys"], 2 * HALF, KNN, bf16, False)),
    ]  # fmt: skip
    found = []
    for module, hook, variants, launch in shaped:
        with hooks_restored(module, hook):
            for shape in variants:
                setattr(module, hook, lambda *_, c=shape, **__: c)
                found += launch()
    return found + decode_sweep_launches()


def decode_sweep_launches() -> list:
    """The launches of bench_inference.py's decode sweep: a decode token's top-k under each
    (BLOCK_K, warps, stages, SPLITS, merge warps), its projections under each block shape."""
    from bench_inference import (
        DECODE_SCAN_VARIANTS,
        LINEAR_VARIANTS,
        install_linear_shape,
        install_scan_shape,
    )

    d, found = INFERENCE["d_model"], []
    with hooks_restored(triton_topk, "scan_blocks", "split_scan"):
        for shape in DECODE_SCAN_VARIANTS:
            install_scan_shape(shape)
            for n in DECODE_SIZES:
                found += topk_launches(n, HEADS, INFERENCE["n_keys"], 2 * HALF, KNN,
                                       torch.bfloat16, softmax=True)  # fmt: skip
    with hooks_restored(triton_linear, "linear_blocks"):
        for shape in LINEAR_VARIANTS:
            install_linear_shape(shape)
            found += linear_launches(1, d, (HEADS * 2 * HALF, d), torch.bfloat16)
            found += linear_launches(1, d, (d,), torch.bfloat16)
    return found


def h100_use_pdl(device, programs: int) -> bool:
    """pdl.use_pdl as on an H100 (132 SMs), for the meta tensors the launches here take."""
    return pdl.ENABLED and pdl.grid_fits(9, H100_SMS, programs)


def launches(quick: bool) -> list:
    """The launches below with the H100's choice of programmatic dependent launch."""
    real = pdl.use_pdl
    pdl.use_pdl = h100_use_pdl
    try:
        return _launches(quick)
    finally:
        pdl.use_pdl, pdl.ENABLED = real, True


def _launches(quick: bool) -> list:
    """The launches of the GPU runs (benchmarks/gpu_shapes.py): bench_kernels' training
    configs (bag, top-k, fused updates), bench_inference's lookups, kernel_check's shapes in
    every dtype, the largest top-k the CUDA dispatcher sends to Triton, small knn, and the
    block shapes bench_kernels.py's sweep times."""
    bf16, picks, k_dim = torch.bfloat16, HEADS * KNN, 2 * HALF
    found = []
    for c in TRAINING.values():
        rows = c["n_keys"] ** 2
        found += bag_launches(c["tokens"], picks, rows, c["v_dim"], bf16, backward=True)
        found += topk_launches(c["tokens"], HEADS, c["n_keys"], k_dim, KNN, bf16, False, True)
        found += gate_launches(c["tokens"], c["v_dim"], bf16)
        for dtype in (bf16, torch.float32):  # the values step times both tables
            found += update_launches(c["tokens"], rows, c["v_dim"], picks, dtype)
    d, n_keys = INFERENCE["d_model"], INFERENCE["n_keys"]
    for enabled in (False, True):  # bench_inference times the layer both ways; on last
        pdl.ENABLED = enabled
        for n in INFERENCE_TOKENS:
            found += topk_launches(n, HEADS, n_keys, k_dim, KNN, bf16, softmax=True)
            found += bag_launches(n, picks, n_keys**2, d, bf16, backward=False, gated=True)
            if n <= triton_linear.MAX_TOKENS:
                found += linear_launches(n, d, (HEADS * k_dim, d), bf16)  # query, gate
                found += linear_launches(n, d, (d,), bf16)  # out
    if quick:
        return found
    found += sweep_launches()
    for dtype in (bf16, torch.float16, torch.float32):
        for shape in CHECK_BAG:
            found += bag_launches(*shape, dtype, backward=True)
        for shape in CHECK_TOPK:
            found += topk_launches(*shape, dtype, softmax=False, backward=True)
        for n, heads, n_keys, k_dim_, knn, v_dim in CHECK_LOOKUP:
            found += topk_launches(n, heads, n_keys, k_dim_, knn, dtype, softmax=True)
            found += bag_launches(n, heads * knn, n_keys**2, v_dim, dtype, False, gated=True)
        for n, d_in, widths in CHECK_LINEARS:
            found += linear_launches(n, d_in, widths, dtype)
        for n, v_dim in CHECK_GATE:
            found += gate_launches(n, v_dim, dtype)
        for n in (1, 4096):  # knn 64 at the widest half the dispatcher allows for the dtype
            half = 256 if dtype == torch.float32 else 512
            found += topk_launches(n, HEADS, 1024, 2 * half, 64, dtype, softmax=True)
        for n, knn in ((3, 1), (3, 3), (4096, 1)):  # the GPU tests' edges: knn 1 and 3, split
            found += topk_launches(n, 3, 300, 32, knn, dtype, softmax=True)  # scan or not
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 at the benchmark sizes only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = {}
    for kernel, args_, kwargs in launches(args.quick):
        source, options = bind(kernel, args_, kwargs)
        key = (kernel.__name__, repr(source.signature), repr(source.constants),
               repr(source.attrs), repr(sorted(options.items())))  # fmt: skip
        variants.setdefault(key, (kernel, source, options))
    rows, failed = [], False
    for kernel, source, options in variants.values():
        row = check_variant(kernel, source, options)
        failed |= not row["ok"]
        rows.append(row)
        shown = row.get("error") or (
            f"shared {row['shared_bytes'] / 1024:.0f} KB, {row['registers']} registers, "
            f"{row['stack_bytes']} B stack, {row['sass_instructions']} instructions"
        )
        data = next(t for t in row["types"].values() if t[:3] in ("*fp", "*bf"))
        consts = " ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['kernel']} {data} [{consts}] {shown}",
              flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__,
                                         "variants": rows}, indent=2) + "\n")  # fmt: skip
    print(f"{len(rows)} variants, {sum(not r['ok'] for r in rows)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
