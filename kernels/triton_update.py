"""Triton kernels of the fused value update (`fused_update.py` states the math).

The update kernel runs one program per table row (no host synchronisation: untouched rows
exit at once). The reverse index of `triton_bag` (the (token, pick) pairs sorted by row,
stably, and each row's range) gives a row its pairs; the program holds the whole row in
registers, aggregates its gradient in float32 from those pairs' output gradients and, in
the same pass, the weight gradient of each pair (read from the row before the step), then
applies the optimizer step to the row and its state and writes them back. The value
gradient is never written to memory. No atomics: the result is deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fused_update import (
    fused_row_update_reference,
    row_grad_sq_reference,
    weight_grad_reference,
)
from .triton_bag import aggregate_row, reverse_index, row_blocks

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ROW = 16384  # widest row one program holds in registers


@triton.jit
def _row_sq_kernel(
    values, grad_out, weights, order, offsets, row_sq, picks, v_dim,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    first = tl.load(offsets + row)
    last = tl.load(offsets + row + 1)
    cols = tl.arange(0, BLOCK_V)
    col_mask = cols < v_dim
    acc = aggregate_row(
        grad_out, weights, order, weights, cols, first, last, cols, col_mask, picks, v_dim,
        False, WEIGHT_GRAD=False, BLOCK_P=BLOCK_P, BLOCK_V=BLOCK_V,
    )  # fmt: skip
    tl.store(row_sq + row, tl.sum(acc * acc, axis=0))


@triton.jit
def _update_kernel(
    values, state_a, state_b, grad_out, weights, order, offsets, grad_weights, row_sq, scale,
    picks, v_dim, lr, eps, beta1, beta2, decay, step_size, bc2_sqrt, inv_width, seed,
    ADAM: tl.constexpr, WEIGHT_GRAD: tl.constexpr, HAS_ROW_SQ: tl.constexpr,
    HAS_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    first = tl.load(offsets + row)
    last = tl.load(offsets + row + 1)
    if last > first:
        cols = tl.arange(0, BLOCK_V)
        col_mask = cols < v_dim
        ptrs = row * v_dim + cols
        w_row = tl.load(values + ptrs, mask=col_mask, other=0.0).to(tl.float32)
        g = aggregate_row(grad_out, weights, order, grad_weights, w_row, first, last, cols,
                          col_mask, picks, v_dim, False, WEIGHT_GRAD=WEIGHT_GRAD,
                          BLOCK_P=BLOCK_P, BLOCK_V=BLOCK_V)  # fmt: skip
        gain = 1.0
        if HAS_SCALE:
            gain = tl.load(scale).to(tl.float32)
            g = g * gain
        if ADAM:
            m = tl.load(state_a + ptrs, mask=col_mask, other=0.0)
            v = tl.load(state_b + ptrs, mask=col_mask, other=0.0)
            m = m * beta1 + (1.0 - beta1) * g
            v = v * beta2 + (1.0 - beta2) * g * g
            tl.store(state_a + ptrs, m, mask=col_mask)
            tl.store(state_b + ptrs, v, mask=col_mask)
            new = w_row * decay - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        else:
            if HAS_ROW_SQ:
                sq = tl.load(row_sq + row).to(tl.float32) * gain * gain
            else:
                sq = tl.sum(g * g, axis=0)
            s = tl.load(state_a + row) + sq * inv_width
            tl.store(state_a + row, s)
            new = w_row * decay - lr * g / (tl.sqrt(s) + eps)
        if STOCHASTIC:  # bf16: add 16 random low bits, then truncate them
            noise = tl.randint(seed, ptrs.to(tl.uint32)) & 0xFFFF
            bits = (new.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
            new = bits.to(tl.float32, bitcast=True)
        tl.store(values + ptrs, new.to(values.dtype.element_ty), mask=col_mask)


@triton.jit
def _weight_grad_kernel(
    grad_out, values, indices, grad_weights, picks, v_dim,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    for p_start in range(0, picks, BLOCK_B):
        offs = p_start + tl.arange(0, BLOCK_B)
        pick_mask = offs < picks
        rows = tl.load(indices + token * picks + offs, mask=pick_mask, other=0)
        acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for v_start in range(0, v_dim, BLOCK_V):
            cols = v_start + tl.arange(0, BLOCK_V)
            col_mask = cols < v_dim
            g = tl.load(grad_out + token * v_dim + cols, mask=col_mask, other=0.0).to(tl.float32)
            tile = tl.load(
                values + rows[:, None] * v_dim + cols[None, :],
                mask=pick_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(tile * g[None, :], axis=1)
        tl.store(grad_weights + token * picks + offs, acc, mask=pick_mask)


def _triton_ok(values: torch.Tensor) -> bool:
    return values.dtype in _DTYPES and values.shape[1] <= _MAX_ROW


def bag_weight_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor):
    if values.dtype not in _DTYPES:
        return weight_grad_reference(grad_out, values, indices)
    grad_out, values, indices = grad_out.contiguous(), values.contiguous(), indices.contiguous()
    n, picks = indices.shape
    out = torch.empty(n, picks, dtype=torch.float32, device=values.device)
    if n and picks:
        block_v = min(triton.next_power_of_2(max(values.shape[1], 1)), 256)
        block_b = min(triton.next_power_of_2(picks), 32)
        _weight_grad_kernel[(n,)](grad_out, values, indices, out, picks, values.shape[1],
                                  BLOCK_B=block_b, BLOCK_V=block_v)  # fmt: skip
    return out


def row_grad_sq(values, indices, weights, grad_out) -> torch.Tensor:
    if not _triton_ok(values):
        return row_grad_sq_reference(values, indices, weights, grad_out)
    indices, weights, grad_out = indices.contiguous(), weights.contiguous(), grad_out.contiguous()
    n_rows, v_dim = values.shape
    out = torch.zeros(n_rows, dtype=torch.float32, device=values.device)
    if indices.numel() == 0:
        return out
    order, offsets = reverse_index(indices, n_rows)
    block_v, block_p, warps = row_blocks(v_dim, widest=_MAX_ROW)
    _row_sq_kernel[(n_rows,)](values, grad_out, weights, order, offsets, out,
                              indices.shape[1], v_dim, BLOCK_P=block_p, BLOCK_V=block_v,
                              num_warps=warps)  # fmt: skip
    return out


def fused_row_update(
    values, state_a, state_b, indices, weights, grad_out, row_sq, scale, optimizer, lr, eps,
    beta1, beta2, weight_decay, width, step, seed, stochastic_rounding, weight_grad,
):  # fmt: skip
    """The Triton form of `memcompile::fused_row_update` (same arguments and result)."""
    if not _triton_ok(values) or not values.is_contiguous():
        return fused_row_update_reference(
            values, state_a, state_b, indices, weights, grad_out, row_sq, scale, optimizer,
            lr, eps, beta1, beta2, weight_decay, width, step, seed, stochastic_rounding,
            weight_grad,
        )  # fmt: skip
    indices, weights, grad_out = indices.contiguous(), weights.contiguous(), grad_out.contiguous()
    n_rows, v_dim = values.shape
    adam = optimizer == "adam"
    grad_w = torch.empty(indices.shape if weight_grad else (0,), dtype=torch.float32,
                         device=values.device)  # fmt: skip
    if indices.numel() == 0:
        return grad_w
    order, offsets = reverse_index(indices, n_rows)
    block_v, block_p, warps = row_blocks(v_dim, widest=_MAX_ROW)
    # Unused pointer arguments get a non-empty stand-in (a null pointer is refused on CUDA).
    _update_kernel[(n_rows,)](
        values, state_a, state_b if adam else state_a, grad_out, weights, order, offsets,
        grad_w if weight_grad else weights, row_sq if row_sq is not None else weights,
        scale if scale is not None else weights,
        indices.shape[1], v_dim, lr, eps, beta1, beta2, 1.0 - lr * weight_decay,
        lr / (1 - beta1**step) if adam else 0.0,
        math.sqrt(1 - beta2**step) if adam else 1.0, 1.0 / width, seed,
        ADAM=adam, WEIGHT_GRAD=weight_grad, HAS_ROW_SQ=row_sq is not None,
        HAS_SCALE=scale is not None,
        STOCHASTIC=stochastic_rounding and values.dtype == torch.bfloat16,
        BLOCK_P=block_p, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip
    return grad_w
