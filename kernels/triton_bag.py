"""Triton kernels of `memcompile::bag`: the weighted bag forward and its backward.

Forward: one program per (token, v-block) sums `heads*knn` gathered rows in float32.
Backward: the row pass of `triton_rows` (each row's gradient from the (token, pick) pairs
sorted by row, and each pair's weight gradient in the same pass; deterministic). With
`rows` given, only those rows are computed (a row-sparse value gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_previous_kernel
from .row_lists import reverse_index
from .triton_options import COMPILE_OPTIONS
from .triton_rows import row_pass

_FORWARD_MIN_PROGRAMS = 128  # about one per SM of an H100
_TILE = 8192  # elements of values a forward program gathers per step
# Widest column block of a forward program: whole rows. H100, 1.3B-like, 2026-11-26:
# whole rows ran at 0.98 of copy bandwidth, 256 columns a program at 0.55.
_MAX_BLOCK_V = 4096


@triton.jit
def _bag_forward_kernel(
    values, indices, weights, swilu, out, picks, v_dim,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_dim
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, picks, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        pick_mask = offs < picks
        rows = tl.load(indices + token * picks + offs, mask=pick_mask, other=0)
        w = tl.load(weights + token * picks + offs, mask=pick_mask, other=0.0).to(tl.float32)
        tile = tl.load(
            values + rows[:, None] * v_dim + cols[None, :],
            mask=pick_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(tile * w[:, None], axis=0)
    if GATED:  # Memory+: the bag times silu(swilu), in float32, rounded once
        g = tl.load(swilu + token * v_dim + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc *= g * tl.sigmoid(g)
    tl.store(out + token * v_dim + cols, acc.to(out.dtype.element_ty), mask=col_mask)


def forward_blocks(n: int, picks: int, v_dim: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_V, num_warps) of the forward: whole rows, unless a few tokens
    (decode) would leave most SMs idle; then narrower column blocks, more programs."""
    block_v = min(triton.next_power_of_2(max(v_dim, 1)), _MAX_BLOCK_V)
    while block_v > 64 and n * triton.cdiv(v_dim, block_v) < _FORWARD_MIN_PROGRAMS:
        block_v //= 2
    # Up to 8K elements a step: a decode token's narrow blocks load all their picks at once,
    # every gather in flight before the first use.
    block_b = max(1, min(triton.next_power_of_2(picks), _TILE // block_v))
    return block_b, block_v, 4  # 8 warps over 1024 columns ran at half the speed


def bag_forward(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    swilu: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted bag (N, v_dim) in values.dtype; with `swilu` (N, v_dim), the bag times
    silu(swilu) in swilu's dtype (the Memory+ gating, one launch less at decode)."""
    values, indices, weights = values.contiguous(), indices.contiguous(), weights.contiguous()
    n, picks = indices.shape
    v_dim = values.shape[1]
    dtype = values.dtype if swilu is None else swilu.dtype
    # On the indices' device: values may be pinned host memory that the GPU reads directly.
    out = torch.empty(n, v_dim, dtype=dtype, device=indices.device)
    if n == 0 or picks == 0:
        return out.zero_()
    block_b, block_v, warps = forward_blocks(n, picks, v_dim)
    grid = (n, triton.cdiv(v_dim, block_v))
    gated = swilu is not None
    dependent = pdl.use_pdl(indices.device, grid[0] * grid[1])  # decode: one token's few programs
    _bag_forward_kernel[grid](
        values, indices, weights, swilu.contiguous() if gated else out, out, picks, v_dim,
        BLOCK_B=block_b, BLOCK_V=block_v, GATED=gated, PDL=dependent, num_warps=warps,
        launch_pdl=dependent, **COMPILE_OPTIONS,
    )  # fmt: skip
    return out


def bag_backward(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_values, grad_weights). With `rows` (int64, distinct), grad_values holds only those
    rows' gradients, in that order: the row-sparse form."""
    grad_out, values = grad_out.contiguous(), values.contiguous()
    indices, weights = indices.contiguous(), weights.contiguous()
    n_rows, v_dim = values.shape
    grad_values = values.new_empty(n_rows if rows is None else rows.shape[0], v_dim)
    order, offsets = reverse_index(indices, n_rows)
    grad_weights = row_pass(0, grad_out, weights, order, offsets, values, out=grad_values,
                            rows=rows, weight_grad=True)  # fmt: skip
    return grad_values, grad_weights.to(weights.dtype)

