"""One bag backward and one fused Adagrad step at the 1.3B-like config, then the bag backward
with L2 eviction priorities (`PassShape.l2_hints`), with the output-gradient rows held in
L2's persisting set-aside (`PassShape.l2_window`) and with the rows walked by first token
(`PassShape.token_order`), between
cudaProfilerStart and cudaProfilerStop, for Nsight Compute to read the row pass's
counters (L2 hit rate of the gathers, stall reasons, occupancy): the measurements the row
pass's next change should start from (benchmarks/GPU_NOTES.md, run 6). Run by
`gpu_check.sh --profile-rows` as

    ncu --profile-from-start off --clock-control none -k regex:_rows_kernel \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section Occupancy python3 benchmarks/profile_row_pass.py
"""

from __future__ import annotations

import sys

import torch
from gpu_shapes import DTYPE, HEADS, KNN, PROFILED, TRAINING
from gpu_timing import DEVICE, start


def main() -> int:
    cannot = start()
    if cannot:
        print(f"profile_row_pass.py {cannot}", file=sys.stderr)
        return 2
    from memcompile.kernels import cuda, l2_residency, triton_rows
    from memcompile.runtime.fused_table import FusedTable, ValueOptimizer

    shape, dev, dt = TRAINING[PROFILED], DEVICE, DTYPE
    rows, picks = shape["n_keys"] ** 2, HEADS * KNN
    g = torch.Generator(device=dev).manual_seed(0)
    values = torch.randn(rows, shape["v_dim"], device=dev, generator=g).to(dt)
    indices = torch.randint(0, rows, (shape["tokens"], picks), device=dev, generator=g)
    weights = torch.softmax(torch.randn(shape["tokens"], picks, device=dev, generator=g), -1)
    grad = torch.randn(shape["tokens"], shape["v_dim"], device=dev, generator=g).to(dt)
    table_values = values.clone().requires_grad_()
    leaf_weights = weights.clone().requires_grad_()
    table = FusedTable(table_values, ValueOptimizer("rowwise_adagrad", 1e-3))

    default = triton_rows.pass_blocks

    def with_l2(**change):
        return lambda *a, **k: triton_rows.PassShape(*default(*a, **k))._replace(**change)

    def steps():
        cuda.bag_backward_cuda(grad, values, indices, weights)
        table.bag(table_values, indices, leaf_weights).backward(grad)
        try:  # the same backward with each of the three L2 options
            for change in (dict(l2_hints=True), dict(l2_window=True), dict(token_order=True)):
                triton_rows.pass_blocks = with_l2(**change)
                cuda.bag_backward_cuda(grad, values, indices, weights)
        finally:
            triton_rows.pass_blocks = default

    steps()  # compiled and warm before the profiled pass
    if dev == "cuda":  # not in a rehearsal
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    steps()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profiled, in order: one bag backward, one fused Adagrad step, the bag backward "
          f"with L2 eviction priorities, with the L2 window, walked by first token ({PROFILED}, "
          f"{str(dt)[6:]}; window: {l2_residency.status()})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
