"""Triton kernels of `memcompile::bag`: the weighted bag forward and its backward.

Forward: one program per (token, v-block) sums `heads*knn` gathered rows in float32.
Backward: a reverse index (the (token, pick) pairs sorted by row, stably) gives each row
its list of pairs; one program per row accumulates that row's value gradient and, in the
same pass, the weight gradient of each of its pairs (a dot of the row with the token's
output gradient). No atomics: the result is deterministic. With `rows` given, only those
rows are computed (a row-sparse value gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_PICKS_PER_STEP = 16  # at most this many (token, pick) pairs a backward step handles
_FORWARD_MIN_PROGRAMS = 128  # about one per SM of an H100
_TILE = 8192  # elements of values a forward program gathers per step
# Widest column block of a forward program: whole rows. H100, 1.3B-like, 2026-11-26:
# whole rows ran at 0.98 of copy bandwidth, 256 columns a program at 0.55.
_MAX_BLOCK_V = 4096
# Output-gradient elements a backward step holds, and the widest column block of a
# backward program. The same run swept the backward's blocks: 1024 columns by 4 pairs in
# 4 warps took 7.2 ms; whole 2048-column rows 7.8 ms (2 pairs, 8 warps), 8.05 ms (4 pairs,
# 4 warps) and 13.0 ms (4 pairs, 8 warps); 8 pairs a step or 16 warps 27 to 37 ms.
_BACKWARD_TILE = 4096
_MAX_BACKWARD_BLOCK_V = 1024


@triton.jit
def _bag_forward_kernel(
    values, indices, weights, out, picks, v_dim,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
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
    tl.store(out + token * v_dim + cols, acc.to(out.dtype.element_ty), mask=col_mask)


@triton.jit
def aggregate_row(
    grad_out, weights, order, grad_weights, w_row, first, last, cols, col_mask, picks, v_dim,
    accumulate, WEIGHT_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One value row's gradient over the columns `cols`, in float32: the sum of weight x
    grad_out[token] over the row's (token, pick) pairs order[first:last] (the reverse
    index). With WEIGHT_GRAD also each pair's weight gradient over these columns,
    grad_out[token] . w_row, stored into grad_weights, or added to it when `accumulate`
    (the row's later column blocks). Shared by the bag backward and the fused update."""
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(first, last, BLOCK_P):
        offs = start + tl.arange(0, BLOCK_P)
        pair_mask = offs < last
        pair = tl.load(order + offs, mask=pair_mask, other=0)  # flat token * picks + pick
        token = pair // picks
        w = tl.load(weights + pair, mask=pair_mask, other=0.0).to(tl.float32)
        g = tl.load(
            grad_out + token[:, None] * v_dim + cols[None, :],
            mask=pair_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g * w[:, None], axis=0)
        if WEIGHT_GRAD:
            partial = tl.sum(g * w_row[None, :], axis=1)
            if accumulate:
                partial += tl.load(grad_weights + pair, mask=pair_mask, other=0.0)
            tl.store(grad_weights + pair, partial, mask=pair_mask)
    return acc


@triton.jit
def _bag_backward_kernel(
    grad_out, values, weights, order, offsets, row_ids, grad_values, grad_weights,
    picks, v_dim,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0).to(tl.int64)
    row = tl.load(row_ids + program).to(tl.int64)
    first = tl.load(offsets + row)
    last = tl.load(offsets + row + 1)
    for v_start in range(0, v_dim, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < v_dim
        if last > first:
            value_row = tl.load(values + row * v_dim + cols, mask=col_mask, other=0.0)
            acc = aggregate_row(
                grad_out, weights, order, grad_weights, value_row.to(tl.float32), first, last,
                cols, col_mask, picks, v_dim, v_start > 0,
                WEIGHT_GRAD=True, BLOCK_P=BLOCK_P, BLOCK_V=BLOCK_V,
            )  # fmt: skip
        else:  # an untouched row: a zero gradient, without reading the row
            acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
        out_cols = program * v_dim + cols
        tl.store(grad_values + out_cols, acc.to(grad_values.dtype.element_ty), mask=col_mask)


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


def row_blocks(v_dim: int, widest: int = _MAX_BACKWARD_BLOCK_V) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_P, num_warps) of a program that aggregates one value row's
    gradient: column blocks of up to `widest` (the fused update holds whole rows) and
    about _BACKWARD_TILE gradient elements (BLOCK_P pairs) a step."""
    block_v = min(triton.next_power_of_2(max(v_dim, 1)), widest)
    block_p = max(1, min(_PICKS_PER_STEP, _BACKWARD_TILE // block_v))
    return block_v, block_p, 4 if block_v <= 1024 else 8


def bag_forward(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    values, indices, weights = values.contiguous(), indices.contiguous(), weights.contiguous()
    n, picks = indices.shape
    v_dim = values.shape[1]
    # On the indices' device: values may be pinned host memory that the GPU reads directly.
    out = torch.empty(n, v_dim, dtype=values.dtype, device=indices.device)
    if n == 0 or picks == 0:
        return out.zero_()
    block_b, block_v, warps = forward_blocks(n, picks, v_dim)
    grid = (n, triton.cdiv(v_dim, block_v))
    _bag_forward_kernel[grid](values, indices, weights, out, picks, v_dim,
                              BLOCK_B=block_b, BLOCK_V=block_v, num_warps=warps)  # fmt: skip
    return out


def reverse_index(indices: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): flat (token, pick) positions sorted by row, stably, and each row's
    [offsets[r], offsets[r+1]) range in `order`. No host synchronisation."""
    flat = indices.reshape(-1)
    sorted_rows, order = torch.sort(flat, stable=True)
    bounds = torch.arange(n_rows + 1, device=flat.device, dtype=sorted_rows.dtype)
    offsets = torch.searchsorted(sorted_rows, bounds)
    return order, offsets


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
    n, picks = indices.shape
    n_rows, v_dim = values.shape
    row_ids = torch.arange(n_rows, device=values.device) if rows is None else rows.contiguous()
    grad_values = values.new_empty(row_ids.shape[0], v_dim)
    grad_weights = torch.zeros(n, picks, dtype=torch.float32, device=values.device)
    if row_ids.shape[0] == 0:
        return grad_values, grad_weights.to(weights.dtype)
    order, offsets = reverse_index(indices, n_rows)
    block_v, block_p, warps = row_blocks(v_dim)
    _bag_backward_kernel[(row_ids.shape[0],)](
        grad_out, values, weights, order, offsets, row_ids, grad_values, grad_weights,
        picks, v_dim, BLOCK_P=block_p, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip
    return grad_values, grad_weights.to(weights.dtype)


def bag_backward_sparse(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, grad_rows, grad_weights): the value gradient of the touched rows only, for
    optimizers that update rows (torch.unique synchronises with the host once)."""
    rows = torch.unique(indices)
    grad_rows, grad_weights = bag_backward(grad_out, values, indices, weights, rows)
    return rows, grad_rows, grad_weights
