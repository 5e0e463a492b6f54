"""The row pass of the bag backward and of the fused value update: for each table row, the
sum of weight x grad_out[token] over the row's (token, pick) pairs, then one of three ends.

The pairs come from a reverse index (`reverse_index`: the flat (token, pick) positions
sorted by row, stably, and each row's range). Each program walks every k-th entry of a list
of rows (a few hundred a program) over one block of columns. A row needs three dependent
reads: its range, then its pairs, then their output-gradient rows. The program keeps them
in flight for three rows at once, one step apart, and sums the row whose reads were issued
a step earlier, so a step waits about one read instead of three. (The first form, one row a
program with its reads in a chain, took 7.2 ms at the 1.3B-like config on an H100 where
its bytes allow about 4; across the sweep of its shapes the time followed waves of programs
x dependent reads, not bytes: benchmarks/GPU_NOTES.md.) Column blocks are the grid's slow
axis, so the programs running together gather the same columns of the output gradient
(16,384 tokens x 1024 columns of bf16: 32 MB, against 64 MB for whole rows; L2 is 50 MB).

A row's first BLOCK_P pairs are in the pipeline; a row with more reads the rest in an inner
loop. No atomics: the results are deterministic.

MODE 0 writes the row's gradient (`out` is the value gradient), MODE 1 its squared norm over
the block's columns (`out` is (column blocks, rows)), MODE 2 applies an optimizer step to
the row in place (`fused_update.py` states the math). With WEIGHT_GRAD each pair's share of
its weight gradient over the block's columns, grad_out[token] . values[row] (read before a
step), goes to grad_weights[block, pair].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 1024  # columns a program holds
_MAX_BLOCK_P = 16
_TILE = 4096  # gathered elements a pipeline step holds (BLOCK_P x BLOCK_V)
_ROWS_PER_PROGRAM = 256


@triton.jit
def _bounds(starts, stops, row_ids, slot, n_out, SPARSE: tl.constexpr):
    """(row, first, last) of list entry `slot`: its table row and its pairs' range."""
    valid = slot < n_out
    row = slot
    if SPARSE:
        row = tl.load(row_ids + slot, mask=valid, other=0)
    first = tl.load(starts + slot, mask=valid, other=0)
    last = tl.load(stops + slot, mask=valid, other=0)
    return row, first, last


@triton.jit
def _live_columns(col_mask, cols, low, high):
    """col_mask where the scalar low < high, else all False. (Compared as a block: Triton's
    interpreter, 3.9, refuses a mask made of a scalar comparison and a block.)"""
    return col_mask & (low + cols * 0 < high)


@triton.jit
def _gathers(
    grad_out, weights, values, state_a, state_b, pair, pair_mask, row, first, last, cols,
    col_mask, picks, v_dim, READ_VALUES: tl.constexpr, READ_MOMENTS: tl.constexpr,
):  # fmt: skip
    """The pairs' weights and output-gradient rows; the value row and Adam's moments of it
    (zeros if not read, or if the row has no pairs: first == last)."""
    w = tl.load(weights + pair, mask=pair_mask, other=0.0).to(tl.float32)
    g = tl.load(
        grad_out + (pair // picks).to(tl.int64)[:, None] * v_dim + cols[None, :],
        mask=pair_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    row_mask = _live_columns(col_mask, cols, first, last)
    value_row = tl.zeros(cols.shape, dtype=values.dtype.element_ty)
    m = tl.zeros(cols.shape, dtype=tl.float32)
    v = tl.zeros(cols.shape, dtype=tl.float32)
    if READ_VALUES:
        value_row = tl.load(values + row * v_dim + cols, mask=row_mask, other=0.0)
    if READ_MOMENTS:
        m = tl.load(state_a + row * v_dim + cols, mask=row_mask, other=0.0)
        v = tl.load(state_b + row * v_dim + cols, mask=row_mask, other=0.0)
    return w, g, value_row, m, v


@triton.jit
def _step_row(
    values, state_a, state_b, scale, row, g, w, m, v, cols, live, active, v_dim, lr, eps,
    beta1, beta2, decay, step_size, bc2_sqrt, inv_width, seed,
    ADAM: tl.constexpr, HAS_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr,
    LOCAL_NORM: tl.constexpr,
):  # fmt: skip
    """One optimizer step on the columns `live` of a row (`active`: the row has pairs):
    gradient g, values w and Adam's moments m and v, all float32; writes the row and its
    state. Adagrad with LOCAL_NORM (the whole row in this block) advances the row's state
    here; without, the state was advanced from a norms pass."""
    ptrs = row * v_dim + cols
    if HAS_SCALE:
        g = g * tl.load(scale).to(tl.float32)
    if ADAM:
        m = m * beta1 + (1.0 - beta1) * g
        v = v * beta2 + (1.0 - beta2) * g * g
        tl.store(state_a + ptrs, m, mask=live)
        tl.store(state_b + ptrs, v, mask=live)
        new = w * decay - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    else:
        if LOCAL_NORM:
            s = tl.load(state_a + row, mask=active, other=0.0) + tl.sum(g * g, axis=0) * inv_width
            tl.store(state_a + row, s, mask=active)
        else:
            s = tl.load(state_a + row + cols * 0, mask=live, other=1.0)
        new = w * decay - lr * g / (tl.sqrt(s) + eps)
    if STOCHASTIC:  # bf16: add 16 random low bits, then truncate them
        noise = tl.randint(seed, ptrs.to(tl.uint32)) & 0xFFFF
        bits = (new.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
        new = bits.to(tl.float32, bitcast=True)
    tl.store(values + ptrs, new.to(values.dtype.element_ty), mask=live)


@triton.jit
def _row_pass_kernel(
    grad_out, weights, order, starts, stops, row_ids, values, out, grad_weights,
    state_a, state_b, scale,
    n_out, n_pairs, picks, v_dim, lr, eps, beta1, beta2, decay, step_size, bc2_sqrt, inv_width,
    seed,
    MODE: tl.constexpr, SPARSE: tl.constexpr, WEIGHT_GRAD: tl.constexpr, ADAM: tl.constexpr,
    HAS_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, LOCAL_NORM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    READ_VALUES: tl.constexpr = WEIGHT_GRAD or MODE == 2
    READ_MOMENTS: tl.constexpr = ADAM and MODE == 2
    stride = tl.num_programs(0)
    block = tl.program_id(1)
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_dim
    lanes = tl.arange(0, BLOCK_P)
    wgrad = grad_weights + block.to(tl.int64) * n_pairs

    # The pipeline, three rows deep: row 1 gathered, row 2's pairs read, row 3's range read.
    slot1 = tl.program_id(0).to(tl.int64)
    row1, first1, last1 = _bounds(starts, stops, row_ids, slot1, n_out, SPARSE)
    mask1 = first1 + lanes < last1
    pair1 = tl.load(order + first1 + lanes, mask=mask1, other=0)
    slot2 = slot1 + stride
    row2, first2, last2 = _bounds(starts, stops, row_ids, slot2, n_out, SPARSE)
    mask2 = first2 + lanes < last2
    pair2 = tl.load(order + first2 + lanes, mask=mask2, other=0)
    slot3 = slot2 + stride
    row3, first3, last3 = _bounds(starts, stops, row_ids, slot3, n_out, SPARSE)
    w1, g1, value1, m1, v1 = _gathers(grad_out, weights, values, state_a, state_b, pair1, mask1,
                                      row1, first1, last1, cols, col_mask, picks, v_dim,
                                      READ_VALUES, READ_MOMENTS)  # fmt: skip
    for _ in range(tl.program_id(0), n_out, stride):  # slot1 walks the same list
        # Issue the next rows' reads before summing this one.
        w2, g2, value2, m2, v2 = _gathers(grad_out, weights, values, state_a, state_b, pair2,
                                          mask2, row2, first2, last2, cols, col_mask, picks,
                                          v_dim, READ_VALUES, READ_MOMENTS)  # fmt: skip
        mask3 = first3 + lanes < last3
        pair3 = tl.load(order + first3 + lanes, mask=mask3, other=0)
        slot4 = slot3 + stride
        row4, first4, last4 = _bounds(starts, stops, row_ids, slot4, n_out, SPARSE)

        acc = tl.sum(g1.to(tl.float32) * w1[:, None], axis=0)
        if WEIGHT_GRAD:
            share = tl.sum(g1.to(tl.float32) * value1.to(tl.float32)[None, :], axis=1)
            tl.store(wgrad + pair1, share, mask=mask1)
        # A row with more pairs reads the rest here, each step's pairs read a step ahead.
        extra_mask = first1 + BLOCK_P + lanes < last1
        pair = tl.load(order + first1 + BLOCK_P + lanes, mask=extra_mask, other=0)
        for more in range(first1 + BLOCK_P, last1, BLOCK_P):
            w, g, _unused_row, _unused_m, _unused_v = _gathers(
                grad_out, weights, values, state_a, state_b, pair, extra_mask, row1, 0, 0, cols,
                col_mask, picks, v_dim, False, False,
            )  # fmt: skip
            next_mask = more + BLOCK_P + lanes < last1
            next_pair = tl.load(order + more + BLOCK_P + lanes, mask=next_mask, other=0)
            acc += tl.sum(g.to(tl.float32) * w[:, None], axis=0)
            if WEIGHT_GRAD:
                share = tl.sum(g.to(tl.float32) * value1.to(tl.float32)[None, :], axis=1)
                tl.store(wgrad + pair, share, mask=extra_mask)
            pair, extra_mask = next_pair, next_mask

        if MODE == 0:
            tl.store(out + slot1 * v_dim + cols, acc.to(out.dtype.element_ty),
                     mask=_live_columns(col_mask, cols, slot1, n_out))  # fmt: skip
        elif MODE == 1:
            tl.store(out + block.to(tl.int64) * n_out + slot1, tl.sum(acc * acc, axis=0),
                     mask=slot1 < n_out)  # fmt: skip
        else:  # rows with pairs only (past the list's end first = last = 0)
            live = _live_columns(col_mask, cols, first1, last1)
            _step_row(
                values, state_a, state_b, scale, row1, acc, value1.to(tl.float32), m1, v1, cols,
                live, last1 > first1, v_dim, lr, eps, beta1, beta2, decay, step_size, bc2_sqrt,
                inv_width, seed, ADAM, HAS_SCALE, STOCHASTIC, LOCAL_NORM,
            )  # fmt: skip

        slot1, row1, first1, last1, mask1, pair1 = slot2, row2, first2, last2, mask2, pair2
        w1, g1, value1, m1, v1 = w2, g2, value2, m2, v2
        slot2, row2, first2, last2, mask2, pair2 = slot3, row3, first3, last3, mask3, pair3
        slot3, row3, first3, last3 = slot4, row4, first4, last4


def pass_blocks(v_dim: int, pairs_per_row: float) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_V, num_warps, rows a program) of the row pass. BLOCK_P pairs of a row
    are in the pipeline, twice the average (the rest go through the inner loop: 5% of rows
    at 2 a row), with at most _TILE gathered elements. Programs of a few hundred rows: the
    pipeline's start is a small share of a program, and the GPU runs as many at once as
    their registers allow (Triton 3.6 for sm_90, 1.3B-like: about 114 registers a thread
    for the gradient and the Adagrad update, so 4 programs of 4 warps an SM)."""
    block_p = min(max(triton.next_power_of_2(int(2 * pairs_per_row)), 2), _MAX_BLOCK_P)
    block_v = min(max(triton.next_power_of_2(max(v_dim, 1)), 16), _MAX_BLOCK_V, _TILE // block_p)
    return block_p, block_v, 4, _ROWS_PER_PROGRAM


def reverse_index(indices: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): flat (token, pick) positions sorted by row, stably, and each row's
    [offsets[r], offsets[r+1]) range in `order`; int32 below 2**31 pairs (fewer registers
    in the row pass). No host synchronisation."""
    flat = indices.reshape(-1)
    # int32 with room for the pipeline's lane offsets past a row's end (first + lanes).
    narrow = flat.numel() < 2**31 - 4 * _MAX_BLOCK_P
    # Row ids below 2**31 sort as int32 keys: half the radix passes of int64.
    keys = flat.to(torch.int32) if n_rows < 2**31 else flat
    sorted_rows, order = torch.sort(keys, stable=True)
    bounds = torch.arange(n_rows + 1, device=flat.device, dtype=sorted_rows.dtype)
    offsets = torch.searchsorted(sorted_rows, bounds, out_int32=narrow)
    return (order.to(torch.int32) if narrow else order), offsets


def row_pass(
    mode: int,
    grad_out: torch.Tensor,
    weights: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    values: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    weight_grad: bool = False,
    optimizer_args: dict | None = None,
) -> torch.Tensor | None:
    """Run the row pass over every table row (or the list `rows`, distinct) of the reverse
    index (order, offsets). Mode 0 writes the rows' value gradient into `out`; mode 1
    returns the rows' squared gradient norms, float32; mode 2 steps `values` in place with
    `optimizer_args` (state_a, state_b, scale and the `_row_pass_kernel` scalars). With
    `weight_grad` (modes 0 and 2) returns the weight gradient, float32, shaped as `weights`."""
    if mode == 0 and out is None:
        raise ValueError("row_pass mode 0 writes the value gradient into `out`: pass one")
    v_dim = grad_out.shape[1]
    n_rows = offsets.shape[0] - 1
    n_out = n_rows if rows is None else rows.shape[0]
    block_p, block_v, warps, rows_each = pass_blocks(v_dim, order.numel() / max(n_rows, 1))
    n_blocks = triton.cdiv(v_dim, block_v)
    device = grad_out.device
    if mode == 1:
        out = torch.zeros(n_blocks, n_out, dtype=torch.float32, device=device)
    shares = torch.zeros(n_blocks if weight_grad else 1, order.numel() if weight_grad else 1,
                         dtype=torch.float32, device=device)  # fmt: skip
    if rows is None:
        starts, stops, row_ids = offsets[:-1], offsets[1:], offsets
    else:
        row_ids = rows.to(torch.int64).contiguous()  # the kernel reads it by position
        starts, stops = offsets[row_ids], offsets[row_ids + 1]
    opt = dict(state_a=weights, state_b=weights, scale=weights, lr=0.0, eps=0.0, beta1=0.0,
               beta2=0.0, decay=1.0, step_size=0.0, bc2_sqrt=1.0, inv_width=1.0, seed=0,
               adam=False, has_scale=False, stochastic=False, local_norm=False,
               ) | (optimizer_args or {})  # fmt: skip
    if n_out and order.numel():
        grid = (triton.cdiv(n_out, rows_each), n_blocks)
        # Unused pointer arguments get a non-empty stand-in (a null pointer is refused on CUDA).
        _row_pass_kernel[grid](
            grad_out, weights, order, starts, stops, row_ids, values,
            values if out is None else out, shares, opt["state_a"], opt["state_b"], opt["scale"],
            n_out, order.numel(), weights.shape[-1], v_dim, opt["lr"], opt["eps"],
            opt["beta1"], opt["beta2"], opt["decay"], opt["step_size"], opt["bc2_sqrt"],
            opt["inv_width"], opt["seed"],
            MODE=mode, SPARSE=rows is not None, WEIGHT_GRAD=weight_grad, ADAM=opt["adam"],
            HAS_SCALE=opt["has_scale"], STOCHASTIC=opt["stochastic"],
            LOCAL_NORM=opt["local_norm"],
            BLOCK_P=block_p, BLOCK_V=block_v, num_warps=warps,
        )  # fmt: skip
    elif mode == 0:
        out.zero_()  # no rows or no pairs: a zero gradient
    if mode == 1:
        return out[0] if n_blocks == 1 else out.sum(0)
    if not weight_grad:
        return None
    return (shares[0] if n_blocks == 1 else shares.sum(0)).view(weights.shape)
