"""The block shapes bench_kernels.py's sweep section times (`gpu_check.sh --sweep`,
`--sweep-rows`), each output compared with the kernels' own choice of shape (the sweep's
"default" row, timed first); compile_check.py compiles every one of them for an H100."""

from __future__ import annotations

import torch
from gpu_shapes import DTYPE, HALF, HEADS, KNN
from gpu_timing import DEVICE, bench, hooks_restored, sweep_shapes, zipf_rows

# Block shapes tried by the sweep section (the first of each list is the kernels' choice
# at the 1.3B-like config, but for the Adagrad step's whole rows): (BLOCK_B, BLOCK_V,
# num_warps) of the bag forward; (BLOCK_P, BLOCK_V, num_warps, rows a program, pipeline
# stages) of the row pass (triton_rows.py: the bag backward, and the fused update).
# Blocks under 1024 columns are left out: in the fourth H100 run each halving of BLOCK_V
# cost 3.4x; and shapes that lost in the fifth (BLOCK_P 8, 4 stages, 8 warps over 1024
# columns, 1024 rows a program: GPU_NOTES.md).
FORWARD_VARIANTS = [(4, 2048, 4), (8, 2048, 4), (2, 2048, 4), (8, 1024, 4), (16, 512, 4)]
# (2, 2048, 8 warps) is the shape of the first fused update (one program a row), which took
# 10.9 ms for the Adagrad values step in the third run, against 12.0 for (4, 2048, 8) now;
# whole rows in 4 warps hold 156 registers a thread in the Adagrad step (Triton 3.6, no
# spills): three programs an SM, against two of 8 warps.
# A sixth number splits the rows of more pairs than that over programs (0: no split); a
# seventh, 1, sets L2 eviction priorities (PassShape.l2_hints); an eighth, 1, keeps the
# output-gradient rows in L2's persisting set-aside (l2_window); a ninth, 1, walks the rows
# by first token (token_order). The sweep runs last and may be cut by gpu_check's time
# limit: the L2 variants first. Left out since run 5 measured them slower: BLOCK_P 2 at
# 1024 columns (7.23 ms against 6.66), 2 stages (7.36); the same: 64 rows a program (6.64).
ROW_PASS_VARIANTS = [(4, 1024, 4, 256, 3, 0), (4, 1024, 4, 256, 3, 0, 0, 0, 1),
                     (4, 1024, 4, 256, 3, 0, 1, 0, 1), (4, 1024, 4, 256, 3, 0, 0, 1),
                     (4, 1024, 4, 256, 3, 0, 1, 1, 1), (4, 1024, 4, 256, 3, 0, 1),
                     (4, 2048, 8, 256, 3, 0), (4, 2048, 8, 256, 3, 0, 0, 0, 1),
                     (4, 2048, 8, 256, 3, 0, 1, 1, 1), (4, 2048, 8, 256, 3, 0, 0, 1),
                     (4, 1024, 4, 256, 3, 256), (4, 2048, 8, 256, 3, 1024),
                     (2, 2048, 8, 256, 3, 0), (4, 2048, 4, 256, 3, 0),
                     (2, 2048, 4, 256, 3, 0)]  # fmt: skip
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the pk_topk scan; (16, 64, 4, 3) was the
# default of the third H100 run.
SCAN_VARIANTS = [(64, 64, 4, 1), (64, 64, 4, 2), (16, 64, 4, 2), (16, 64, 4, 3),
                 (32, 64, 4, 2), (16, 128, 4, 2), (64, 64, 8, 1), (32, 128, 4, 1)]  # fmt: skip


def sweep(
    name: str, tokens: int, n_keys: int, v_dim: int, copy_bw: float, keep, rows_only: bool
) -> None:
    """Bag forward, bag backward, pk_topk forward and the fused Adagrad values step (with
    `rows_only`, the row pass's cases only) under the kernels' own choice of shape, then
    under each block shape above, every output compared with the first's
    (gpu_timing.sweep_shapes); a shape that fails (compile, resources) is reported and the
    sweep goes on. `keep` saves rows."""

    from memcompile.kernels import cuda, l2_residency, triton_bag, triton_rows, triton_topk
    from memcompile.runtime.fused_table import FusedTable, ValueOptimizer

    dev, dt, picks = DEVICE, DTYPE, HEADS * KNN
    g = torch.Generator(device=dev).manual_seed(0)
    values = torch.randn(n_keys**2, v_dim, device=dev, generator=g).to(dt)
    indices = torch.randint(0, n_keys**2, (tokens, picks), device=dev, generator=g)
    weights = torch.softmax(torch.randn(tokens, picks, device=dev, generator=g), -1)
    grad = torch.randn(tokens, v_dim, device=dev, generator=g).to(dt)
    q = torch.randn(tokens, HEADS, 2 * HALF, device=dev, generator=g).to(dt)
    keys = torch.randn(HEADS, 2, n_keys, HALF, device=dev, generator=g).to(dt)
    moved = tokens * picks * v_dim * 2

    def adagrad_step(table_values, leaf_weights, table) -> tuple[torch.Tensor, torch.Tensor]:
        leaf_weights.grad = None
        table.bag(table_values, indices, leaf_weights).backward(grad)
        return table_values.detach(), leaf_weights.grad

    def fresh_table():
        table_values = values.clone().requires_grad_()
        leaf_weights = weights.clone().requires_grad_()
        return table_values, leaf_weights, FusedTable(table_values, ValueOptimizer(
            "rowwise_adagrad", 1e-3))  # fmt: skip

    timed_table = fresh_table()

    row_shape = "BLOCK_P BLOCK_V warps rows_a_program stages split l2_hints l2_window token_order"
    skewed = zipf_rows(n_keys**2, indices.shape, g, 0.8)
    cases = [
        ("bag fwd", triton_bag, "forward_blocks", FORWARD_VARIANTS, "BLOCK_B BLOCK_V warps",
         lambda: cuda.bag_cuda(values, indices, weights)),
        ("bag bwd", triton_rows, "pass_blocks", ROW_PASS_VARIANTS, row_shape,
         lambda: cuda.bag_backward_cuda(grad, values, indices, weights)),
        ("pk_topk fwd", triton_topk, "scan_blocks", SCAN_VARIANTS,
         "BLOCK_N BLOCK_K warps stages",
         lambda: cuda.pk_topk_cuda(q, keys, KNN)),
        # Timed on one table that each step changes; compared on one step of a fresh one.
        ("values step, fused rowwise_adagrad", triton_rows, "pass_blocks", ROW_PASS_VARIANTS,
         row_shape, lambda: adagrad_step(*timed_table), lambda: adagrad_step(*fresh_table())),
        ("bag bwd, Zipf s=0.8 rows", triton_rows, "pass_blocks", ROW_PASS_VARIANTS, row_shape,
         lambda: cuda.bag_backward_cuda(grad, values, skewed, weights)),
    ]  # fmt: skip
    if rows_only:
        cases = [case for case in cases if case[1] is triton_rows]
    for what, module, hook, variants, names, run, *result in cases:

        def install(shape, module=module, hook=hook):
            setattr(module, hook, lambda *_, **__: shape)

        def annotate(shape, module=module):
            if module is triton_rows and triton_rows.PassShape(*shape).l2_window:
                return {"l2_window": l2_residency.status()}  # "on", or why it is off
            return {}

        with hooks_restored(module, hook):
            found, best = sweep_shapes(variants, names, install, run, bench,
                                       result[0] if result else None, annotate)  # fmt: skip
        rows = [{"config": name, "what": f"sweep {what}", "impl": r.pop("shape")} | r
                for r in found]  # fmt: skip
        for row in rows:
            if what == "bag fwd" and "ms" in row:
                row["TB/s"] = round(moved / (row["ms"] * 1e-3) / 1e12, 3)
                row["of_copy"] = round(moved / (row["ms"] * 1e-3) / copy_bw, 3)
        if best is not None:  # to set the default from
            rows.append({"config": name, "what": f"sweep {what}: fastest",
                         "impl": best.pop("shape")} | best)  # fmt: skip
        keep(rows)  # each case's rows are saved before the next case runs
