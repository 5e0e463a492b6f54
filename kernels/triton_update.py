"""Triton kernels of the fused value update (`fused_update.py` states the math).

The update is the row pass of `triton_rows` in its optimizer mode: for each touched row it
aggregates the row's gradient in float32 from the reverse index, in the same pass each
pair's weight gradient (read from the row before the step), then steps the row and its
state in place. The value gradient is never written to memory. No host synchronisation,
no atomics: the result is deterministic.

Row-wise Adagrad needs a row's full gradient norm before any of its column blocks is
stepped. Where a column block holds the whole row, the update pass advances the row's
state itself; otherwise a first pass (mode 1, which gathers the output gradients but reads
no values) gives the norms, and the row states are advanced before the update pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_rows
from .fused_update import (
    fused_row_update_reference,
    row_grad_sq_reference,
    weight_grad_reference,
)
from .row_lists import reverse_index
from .triton_options import COMPILE_OPTIONS
from .triton_rows import row_pass

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
                                  BLOCK_B=block_b, BLOCK_V=block_v, **COMPILE_OPTIONS)  # fmt: skip
    return out


def row_grad_sq(values, indices, weights, grad_out) -> torch.Tensor:
    if values.dtype not in _DTYPES:
        return row_grad_sq_reference(values, indices, weights, grad_out)
    indices, weights, grad_out = indices.contiguous(), weights.contiguous(), grad_out.contiguous()
    order, offsets = reverse_index(indices, values.shape[0])
    return row_pass(1, grad_out, weights, order, offsets, values)


def fused_row_update(
    values, state_a, state_b, indices, weights, grad_out, row_sq, scale, optimizer, lr, eps,
    beta1, beta2, weight_decay, width, step, seed, stochastic_rounding, weight_grad,
):  # fmt: skip
    """The Triton form of `memcompile::fused_row_update` (same arguments and result)."""
    contiguous = all(t.is_contiguous() for t in (values, state_a, state_b))
    if values.dtype not in _DTYPES or not contiguous:
        return fused_row_update_reference(
            values, state_a, state_b, indices, weights, grad_out, row_sq, scale, optimizer,
            lr, eps, beta1, beta2, weight_decay, width, step, seed, stochastic_rounding,
            weight_grad,
        )  # fmt: skip
    indices, weights, grad_out = indices.contiguous(), weights.contiguous(), grad_out.contiguous()
    adam = optimizer == "adam"
    order, offsets = reverse_index(indices, values.shape[0])
    n_rows, v_dim = values.shape
    block_v = triton_rows.pass_blocks(v_dim, order.numel() / max(n_rows, 1), whole_rows=True)[1]
    # Adagrad over whole rows in one column block: the update pass advances each row's state.
    local_norm = not adam and row_sq is None and block_v >= v_dim
    state = state_a  # what the update pass reads as Adagrad's row states
    if not adam and not local_norm:  # s += mean(g**2) over the full row, from a norms pass
        sq = row_sq
        if sq is None:
            sq = row_pass(1, grad_out, weights, order, offsets, values)
        if scale is not None:
            sq = sq * scale.float().reshape(()).square()
        # Touched rows only: a row_sq from outside, or a NaN clip scale, leaves the rest alone.
        touched = offsets[1:] > offsets[:-1]
        # Into a new tensor, stored after the update pass: nothing is written before the
        # pass's kernel is built (see cuda._triton_or_reference).
        state = torch.where(touched, sq, 0.0).to(state_a.dtype).div_(width).add_(state_a)
    grad_w = row_pass(
        2, grad_out, weights, order, offsets, values, weight_grad=weight_grad,
        optimizer_args=dict(
            state_a=state, state_b=state_b if adam else state,
            scale=scale if scale is not None else weights, lr=lr, eps=eps, beta1=beta1,
            beta2=beta2, decay=1.0 - lr * weight_decay,
            step_size=lr / (1 - beta1**step) if adam else 0.0,
            bc2_sqrt=math.sqrt(1 - beta2**step) if adam else 1.0, seed=seed, adam=adam,
            has_scale=scale is not None,
            stochastic=stochastic_rounding and values.dtype == torch.bfloat16,
            local_norm=local_norm, inv_width=1.0 / width,
        ),
    )  # fmt: skip
    if state is not state_a:
        state_a.copy_(state)
    return grad_w if weight_grad else torch.empty(0, dtype=torch.float32, device=values.device)
