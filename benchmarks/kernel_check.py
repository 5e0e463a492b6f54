"""Correctness of the CUDA kernels against a float64 reference, before any timing.

For bf16, fp16 and fp32 tables and queries: relative error ||out - ref|| / ||ref|| of bag
forward, bag backward (values and weights), pk_topk (scores; picked keys must be true
top-knn keys; its backward to the query and the keys), the inference lookup pk_lookup at
decode sizes (the softmax weights, the bag of the picked rows and its Memory+ gating; on a
GPU also with the values in pinned host memory), the decode projections (`linears`, two
maps a launch) and the training step's gating (`silu_gate`, forward and backward), with
every output element checked as written (the caching allocator is
filled with NaN first, so an unwritten element shows). In a rehearsal (rehearsal.py) it
runs through Triton's interpreter on the CPU at gpu_shapes' tiny sizes. Exits 1 on any
failure.

    python benchmarks/kernel_check.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import gpu_shapes
import torch
from gpu_timing import DEVICE, start

from memcompile.kernels import cuda, reference

# Expected relative error for each table dtype (DESIGN: fp32 accumulation in every case).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def poison_allocator(n_bytes: int = 1 << 28) -> None:
    """Fill the allocator's free blocks with NaN so unwritten outputs are visible."""
    if DEVICE == "cuda":
        torch.full((n_bytes // 4,), float("nan"), device=DEVICE)  # freed at once, cached


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def randn(*shape, generator, dtype=torch.float32) -> torch.Tensor:
    # Drawn on the device: a 1024^2 x 2048 table takes ~10 s on the host.
    return torch.randn(*shape, generator=generator, device=DEVICE).to(dtype)


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def check_bag(dtype, n, picks, rows, v_dim) -> dict:
    g = generator(0)
    values = randn(rows, v_dim, generator=g, dtype=dtype)
    indices = torch.randint(0, rows, (n, picks), generator=g, device=DEVICE)
    indices[:, 0] = 1  # a hot row
    weights = torch.softmax(randn(n, picks, generator=g), -1)
    grad = randn(n, v_dim, generator=g, dtype=dtype)
    poison_allocator()
    out = cuda.bag_cuda(values, indices, weights)
    poison_allocator()
    grad_values, grad_weights = cuda.bag_backward_cuda(grad, values, indices, weights)
    touched = torch.unique(indices)
    poison_allocator()
    grad_rows, _ = cuda.bag_backward_rows_cuda(grad, values, indices, weights, touched)
    v64, w64, g64 = values.double().cpu(), weights.double().cpu(), grad.double().cpu()
    ref = reference.bag(v64, indices.cpu(), w64)
    ref_gv, ref_gw = reference.bag_backward(g64, v64, indices.cpu(), w64)
    return {"op": "bag", "dtype": str(dtype), "shape": [n, picks, rows, v_dim],
            "forward": rel_error(out, ref), "grad_values": rel_error(grad_values, ref_gv),
            "grad_weights": rel_error(grad_weights, ref_gw),
            "grad_touched_rows": rel_error(grad_rows, ref_gv[touched.cpu()])}  # fmt: skip


def scores_of_picks(q64: torch.Tensor, k64: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The float64 scores of the full keys `indices` picked (rows i * n_keys + j)."""
    half, n_keys = k64.shape[3], k64.shape[2]
    s1 = torch.einsum("nhd,hkd->nhk", q64[..., :half], k64[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q64[..., half:], k64[:, 1])
    return s1.gather(-1, indices // n_keys) + s2.gather(-1, indices % n_keys)


def check_pk_topk(dtype, n, heads, n_keys, k_dim, knn) -> dict:
    g = generator(1)
    q = randn(n, heads, k_dim, generator=g, dtype=dtype)
    keys = randn(heads, 2, n_keys, k_dim // 2, generator=g, dtype=dtype)
    poison_allocator()
    scores, indices = cuda.pk_topk_cuda(q, keys, knn)
    q64, k64 = q.double().cpu(), keys.double().cpu()
    ref_scores, _ = reference.pk_topk(q64, k64, knn)
    true_scores_of_picks = scores_of_picks(q64, k64, indices.cpu())
    grad = randn(n, heads, knn, generator=g)
    poison_allocator()
    grad_q, grad_keys = cuda.pk_topk_backward_cuda(grad, q, keys, indices)
    ref_q, ref_keys = reference.pk_topk_backward(grad.double().cpu(), q64, k64, indices.cpu())
    return {"op": "pk_topk", "dtype": str(dtype), "shape": [n, heads, n_keys, k_dim, knn],
            "scores": rel_error(scores, ref_scores),
            "picked_vs_best": rel_error(true_scores_of_picks, ref_scores),
            "grad_q": rel_error(grad_q, ref_q),
            "grad_keys": rel_error(grad_keys, ref_keys)}  # fmt: skip


def check_pk_lookup(dtype, n, heads, n_keys, k_dim, knn, v_dim) -> dict:
    from memcompile.kernels import triton_topk

    g = generator(2)
    # Scores of a layer's size (a few units): the softmax multiplies a score's rounding
    # error by the score, and unit-variance halves of 256 would score near 60.
    q = randn(n, heads, k_dim, generator=g, dtype=dtype) * (k_dim // 2) ** -0.5
    keys = randn(heads, 2, n_keys, k_dim // 2, generator=g, dtype=dtype)
    values = randn(n_keys**2, v_dim, generator=g, dtype=dtype)
    poison_allocator()
    out = cuda.pk_lookup_cuda(q, keys, values, knn)
    probs, indices = triton_topk.pk_topk(q, keys, knn, softmax=True)  # the same picks
    q64, k64 = q.double(), keys.double()
    picked = scores_of_picks(q64, k64, indices)
    ref_probs = torch.softmax(picked, -1)
    rows = values[indices.view(n, -1)].double()  # (n, heads*knn, v_dim), gathered on device
    ref = torch.einsum("np,npd->nd", ref_probs.view(n, -1), rows)
    best = reference.pk_topk(q64, k64, knn)[0]
    swilu = randn(n, v_dim, generator=g, dtype=dtype)  # the Memory+ gate, in the epilogue
    poison_allocator()
    gated = cuda.pk_lookup_cuda(q, keys, values, knn, swilu)
    row = {"op": "pk_lookup", "dtype": str(dtype), "shape": [n, heads, n_keys, k_dim, knn, v_dim],
           "forward": rel_error(out, ref), "weights": rel_error(probs, ref_probs),
           "gated": rel_error(gated, ref * torch.nn.functional.silu(swilu.double())),
           "picked_vs_best": rel_error(picked, best)}  # fmt: skip
    if DEVICE == "cuda" and n == 1:  # host-resident values, read from pinned memory
        pinned = values.cpu().pin_memory()
        del values
        poison_allocator()
        row["host_values"] = rel_error(cuda.pk_lookup_cuda(q, keys, pinned, knn), ref)
    return row


def check_silu_gate(dtype, n, v_dim) -> dict:
    g = generator(4)
    x, gate, grad = (randn(n, v_dim, generator=g, dtype=dtype) for _ in range(3))
    poison_allocator()
    out = cuda.silu_gate_cuda(x, gate)
    poison_allocator()
    grad_x, grad_gate = cuda.silu_gate_backward_cuda(grad, x, gate)
    x64, g64, d64 = x.double(), gate.double(), grad.double()
    s = torch.sigmoid(g64)
    return {"op": "silu_gate", "dtype": str(dtype), "shape": [n, v_dim],
            "forward": rel_error(out, x64 * g64 * s), "grad_x": rel_error(grad_x, d64 * g64 * s),
            "grad_gate": rel_error(grad_gate, d64 * x64 * s * (1 + g64 * (1 - s)))}  # fmt: skip


def check_linears(dtype, n, d_in, widths) -> dict:
    g = generator(3)
    x = randn(n, d_in, generator=g, dtype=dtype)
    weights = [randn(w, d_in, generator=g, dtype=dtype) * d_in**-0.5 for w in widths]
    biases = [randn(w, generator=g, dtype=dtype) for w in widths]
    poison_allocator()
    outs = cuda.linears_cuda(x, weights, biases)
    row = {"op": "linears", "dtype": str(dtype), "shape": [n, d_in, *widths]}
    for i, (out, w, b) in enumerate(zip(outs, weights, biases)):
        row[f"map {i}"] = rel_error(out, x.double() @ w.double().t() + b.double())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=str)
    args = parser.parse_args()
    why_not = start()
    if why_not:
        print(f"kernel_check.py {why_not}", file=sys.stderr)
        return 1
    checks = []
    for dtype in TOLERANCE:
        if gpu_shapes.REHEARSAL and dtype == torch.bfloat16:
            continue  # the interpreter's bf16 tl.dot is wrong (gpu_shapes.DTYPE)
        checks += [(check_bag, dtype, shape) for shape in gpu_shapes.CHECK_BAG]
        checks += [(check_pk_topk, dtype, shape) for shape in gpu_shapes.CHECK_TOPK]
        checks += [(check_pk_lookup, dtype, shape) for shape in gpu_shapes.CHECK_LOOKUP]
        checks += [(check_linears, dtype, shape) for shape in gpu_shapes.CHECK_LINEARS]
        checks += [(check_silu_gate, dtype, shape) for shape in gpu_shapes.CHECK_GATE]
    rows, failed = [], False
    for check, dtype, shape in checks:
        try:
            row = check(dtype, *shape)
        except Exception as error:  # report it and run the other checks
            row = {"op": check.__name__.removeprefix("check_"), "dtype": str(dtype),
                   "shape": list(shape), "error": f"{type(error).__name__}: {error}"}  # fmt: skip
        unbuilt = cuda.take_unbuilt()
        if unbuilt:  # its op ran the reference (cuda.py)
            row["error"] = f"Triton kernels not built for {unbuilt}"
        tol = TOLERANCE[dtype]
        errors = {k: v for k, v in row.items() if isinstance(v, float)}
        row["ok"] = "error" not in row and all(v <= tol for v in errors.values())
        failed |= not row["ok"]
        rows.append(row)
        shown = row.get("error") or ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['op']:<9} {row['dtype']:<15} {shown}",
              flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": DEVICE, "checks": rows}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
