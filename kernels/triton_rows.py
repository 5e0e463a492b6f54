"""The row pass of the bag backward and of the fused value update: for each table row, the
sum of weight x grad_out[token] over the row's (token, pick) pairs, then one of three ends.

The pairs come from a reverse index (`row_lists.reverse_index`: the flat (token, pick)
positions sorted by row, stably, and each row's range). A row needs three dependent reads:
its range, then its pairs, then their output-gradient rows. Two kernels share the rows:

- `_short_rows_kernel` takes the rows with at most BLOCK_P pairs (95% of them at two pairs
  a row on average, with BLOCK_P = 4). Each program walks every k-th row of the list over
  one block of columns, in a loop that Triton's software pipeliner runs STAGES rows deep:
  the loads go to shared memory by asynchronous copies, the next row's in flight while a
  row is summed.
- `_long_rows_kernel` takes the rest, listed on the device (no host synchronisation): each
  row is one program's loop over its pairs, BLOCK_P at a time, pipelined the same way. A
  row picked by every token is one such loop (3 ms more at the 1.3B-like config).
- With a split (`PassShape.split`, off by default until an H100 run has timed it), rows of
  more pairs than that are cut into chunks of that many pairs: `_chunk_rows_kernel` sums
  each chunk in its own program-step into a float32 buffer, `_combine_rows_kernel` adds a
  row's chunks in order and ends the row. Still deterministic; a hot row is spread over
  many programs.

On an H100 at the 1.3B-like config (GPU_NOTES.md, run 5) this took 6.6 ms for the bag
backward: 5.5 in the short rows, 0.95 in the long ones. Slower, there: a hand-written
three-row pipeline in registers (7.6 ms); more launches of the short-row kernel for rows of
up to 8 and 16 pairs, with one or two rows a step (7.3 ms, run 6). Its bytes fit the
output-gradient gathers mostly missing L2; three options, off until an H100 run times them,
aim at that (`PassShape`): eviction priorities on the stores, an L2 access policy window
on the output gradient, and walking the rows by first token.

Every row is written by one program, its pairs summed in a fixed order: no atomics,
deterministic results.

MODE 0 writes the row's gradient (`out` is the value gradient), MODE 1 its squared norm over
the block's columns (`out` is (column blocks, rows)), MODE 2 applies an optimizer step to
the row in place (`fused_update.py` states the math). With WEIGHT_GRAD each pair's share of
its weight gradient over the block's columns, grad_out[token] . values[row] (read before a
step), goes to grad_weights[block, pair].
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import l2_residency
from .row_lists import MAX_BLOCK_P, chunks, rows_between, rows_by_first_token
from .triton_options import COMPILE_OPTIONS

_MAX_BLOCK_V = 1024  # columns a program holds
_ROWS_PER_PROGRAM = 256
_STAGES = 3
_LONG_PROGRAMS = 1024  # programs walking the list of long rows (fewer when it is shorter)


@triton.jit
def _program_block(grad_weights, n_pairs, v_dim, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's column block: its index, columns and their mask, the pair lanes, and
    its rows of the weight-gradient shares."""
    block = tl.program_id(1)
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    return (block, cols, cols < v_dim, tl.arange(0, BLOCK_P),
            grad_weights + block.to(tl.int64) * n_pairs)  # fmt: skip


@triton.jit
def _table_row(row_ids, slot, SPARSE: tl.constexpr):
    """The table row of list entry `slot` (the entry itself unless a row list is given)."""
    row = slot
    if SPARSE:
        row = tl.load(row_ids + slot)
    return row


@triton.jit
def _bounds(starts, stops, row_ids, slot, SPARSE: tl.constexpr):
    """(row, first, last) of list entry `slot`: its table row and its pairs' range."""
    return _table_row(row_ids, slot, SPARSE), tl.load(starts + slot), tl.load(stops + slot)


@triton.jit
def _live_columns(col_mask, cols, low, high):
    """col_mask where the scalar low < high, else all False. (Compared as a block: Triton's
    interpreter, 3.9, refuses a mask made of a scalar comparison and a block.)"""
    return col_mask & (low + cols * 0 < high)


@triton.jit
def _pair_gathers(grad_out, weights, order, start, stop, lanes, cols, col_mask, picks, v_dim,
                  KEEP: tl.constexpr):  # fmt: skip
    """The pairs order[start:stop] (at most as many as lanes), their weights and their
    output-gradient rows (read with eviction policy KEEP: each is gathered by many rows)."""
    pair_mask = start + lanes < stop
    pair = tl.load(order + start + lanes, mask=pair_mask, other=0)
    w = tl.load(weights + pair, mask=pair_mask, other=0.0, eviction_policy=KEEP).to(tl.float32)
    g = tl.load(
        grad_out + (pair // picks).to(tl.int64)[:, None] * v_dim + cols[None, :],
        mask=pair_mask[:, None] & col_mask[None, :],
        other=0.0,
        eviction_policy=KEEP,
    )
    return pair, pair_mask, w, g.to(tl.float32)


@triton.jit
def _row_reads(values, state_a, state_b, row, live, cols, v_dim, READ_VALUES: tl.constexpr,
               READ_MOMENTS: tl.constexpr, STREAM: tl.constexpr):  # fmt: skip
    """The value row, float32, and Adam's moments of it (zeros where not read or not live),
    read with eviction policy STREAM (once a pass)."""
    ptrs = row.to(tl.int64) * v_dim + cols
    value_row = tl.zeros(cols.shape, dtype=tl.float32)
    m = tl.zeros(cols.shape, dtype=tl.float32)
    v = tl.zeros(cols.shape, dtype=tl.float32)
    if READ_VALUES:
        value_row = tl.load(values + ptrs, mask=live, other=0.0, eviction_policy=STREAM)
        value_row = value_row.to(tl.float32)
    if READ_MOMENTS:
        m = tl.load(state_a + ptrs, mask=live, other=0.0, eviction_policy=STREAM)
        v = tl.load(state_b + ptrs, mask=live, other=0.0, eviction_policy=STREAM)
    return value_row, m, v


@triton.jit
def _step_row(
    values, state_a, state_b, scale, row, g, w, m, v, cols, live, active, v_dim, lr, eps,
    beta1, beta2, decay, step_size, bc2_sqrt, inv_width, seed,
    ADAM: tl.constexpr, HAS_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr,
    LOCAL_NORM: tl.constexpr, STREAM: tl.constexpr,
):  # fmt: skip
    """One optimizer step on the columns `live` of a row (`active`: the row has pairs):
    gradient g, values w and Adam's moments m and v, all float32; writes the row and its
    state. Adagrad with LOCAL_NORM (the whole row in this block) advances the row's state
    here; without, the state was advanced from a norms pass."""
    ptrs = row.to(tl.int64) * v_dim + cols
    if HAS_SCALE:
        g = g * tl.load(scale).to(tl.float32)
    if ADAM:
        m = m * beta1 + (1.0 - beta1) * g
        v = v * beta2 + (1.0 - beta2) * g * g
        tl.store(state_a + ptrs, m, mask=live, eviction_policy=STREAM)
        tl.store(state_b + ptrs, v, mask=live, eviction_policy=STREAM)
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
    tl.store(values + ptrs, new.to(values.dtype.element_ty), mask=live, eviction_policy=STREAM)


@triton.jit
def _finish_row(
    out, values, state_a, state_b, scale, slot, row, first, last, owned, acc, value_row, m, v,
    cols, col_mask, block, n_out, v_dim, lr, eps, beta1, beta2, decay, step_size, bc2_sqrt,
    inv_width, seed,
    MODE: tl.constexpr, ADAM: tl.constexpr, HAS_SCALE: tl.constexpr,
    STOCHASTIC: tl.constexpr, LOCAL_NORM: tl.constexpr, STREAM: tl.constexpr,
    OUT_BY_ROW: tl.constexpr,
):  # fmt: skip
    """The row's end, by MODE: its gradient acc (float32) from its pairs [first, last);
    nothing is written where `owned` is 0 (a row the other kernel takes: then first = last).
    The gradient or norm goes to the row's place in `out` with OUT_BY_ROW (a dense output
    walked in another order), else to the list entry's."""
    dest = slot
    if OUT_BY_ROW:
        dest = row.to(tl.int64)
    if MODE == 0:
        tl.store(out + dest * v_dim + cols, acc.to(out.dtype.element_ty),
                 mask=_live_columns(col_mask, cols, 0, owned), eviction_policy=STREAM)  # fmt: skip
    elif MODE == 1:
        tl.store(out + block.to(tl.int64) * n_out + dest, tl.sum(acc * acc, axis=0),
                 mask=owned > 0)  # fmt: skip
    else:  # rows with pairs only: a row no token picked keeps its values and state
        _step_row(
            values, state_a, state_b, scale, row, acc, value_row, m, v, cols,
            _live_columns(col_mask, cols, first, last), last > first, v_dim, lr, eps, beta1,
            beta2, decay, step_size, bc2_sqrt, inv_width, seed, ADAM, HAS_SCALE, STOCHASTIC,
            LOCAL_NORM, STREAM,
        )  # fmt: skip


@triton.jit
def _short_rows_kernel(
    grad_out, weights, order, starts, stops, row_ids, values, out, grad_weights,
    state_a, state_b, scale,
    n_out, n_pairs, picks, v_dim, lr, eps, beta1, beta2, decay, step_size, bc2_sqrt, inv_width,
    seed,
    MODE: tl.constexpr, SPARSE: tl.constexpr, WEIGHT_GRAD: tl.constexpr, ADAM: tl.constexpr,
    HAS_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, LOCAL_NORM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
    KEEP: tl.constexpr, STREAM: tl.constexpr, OUT_BY_ROW: tl.constexpr,
):  # fmt: skip
    """The rows of at most BLOCK_P pairs; the others are left to `_long_rows_kernel`."""
    block, cols, col_mask, lanes, wgrad = _program_block(grad_weights, n_pairs, v_dim, BLOCK_P,
                                                         BLOCK_V)  # fmt: skip
    for slot32 in tl.range(tl.program_id(0), n_out, tl.num_programs(0), num_stages=STAGES):
        slot = tl.cast(slot32, tl.int64)
        row, first, last = _bounds(starts, stops, row_ids, slot, SPARSE)
        short = last - first <= BLOCK_P
        end = tl.where(short, last, first)  # a long row: no pairs read here
        pair, pair_mask, w, g = _pair_gathers(grad_out, weights, order, first, end, lanes, cols,
                                              col_mask, picks, v_dim, KEEP)  # fmt: skip
        value_row, m, v = _row_reads(
            values, state_a, state_b, row, _live_columns(col_mask, cols, first, end), cols,
            v_dim, WEIGHT_GRAD or MODE == 2, ADAM and MODE == 2, STREAM,
        )  # fmt: skip
        acc = tl.sum(g * w[:, None], axis=0)
        if WEIGHT_GRAD:
            tl.store(wgrad + pair, tl.sum(g * value_row[None, :], axis=1), mask=pair_mask)
        _finish_row(
            out, values, state_a, state_b, scale, slot, row, first, end, short.to(tl.int32),
            acc, value_row, m, v, cols, col_mask, block, n_out, v_dim, lr, eps, beta1, beta2,
            decay, step_size, bc2_sqrt, inv_width, seed, MODE, ADAM, HAS_SCALE, STOCHASTIC,
            LOCAL_NORM, STREAM, OUT_BY_ROW,
        )  # fmt: skip


@triton.jit
def _sum_pairs(
    grad_out, weights, order, wgrad, first, last, value_row, lanes, cols, col_mask, picks,
    v_dim, WEIGHT_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
    STAGES: tl.constexpr, KEEP: tl.constexpr,
):  # fmt: skip
    """The gradient (float32) of the pairs order[first:last] of one row, BLOCK_P a step,
    pipelined; with WEIGHT_GRAD each pair's weight-gradient share goes to wgrad."""
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in tl.range(first, last, BLOCK_P, num_stages=STAGES):
        pair, pair_mask, w, g = _pair_gathers(grad_out, weights, order, start, last, lanes,
                                              cols, col_mask, picks, v_dim, KEEP)  # fmt: skip
        acc += tl.sum(g * w[:, None], axis=0)
        if WEIGHT_GRAD:
            tl.store(wgrad + pair, tl.sum(g * value_row[None, :], axis=1), mask=pair_mask)
    return acc


@triton.jit
def _long_rows_kernel(
    grad_out, weights, order, starts, stops, row_ids, listed, n_listed, values, out,
    grad_weights, state_a, state_b, scale,
    n_out, n_pairs, picks, v_dim, lr, eps, beta1, beta2, decay, step_size, bc2_sqrt, inv_width,
    seed,
    MODE: tl.constexpr, SPARSE: tl.constexpr, WEIGHT_GRAD: tl.constexpr, ADAM: tl.constexpr,
    HAS_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, LOCAL_NORM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
    KEEP: tl.constexpr, STREAM: tl.constexpr, OUT_BY_ROW: tl.constexpr,
):  # fmt: skip
    """The rows of more than BLOCK_P pairs, BLOCK_P a step: the first n_listed entries of
    `listed`."""
    block, cols, col_mask, lanes, wgrad = _program_block(grad_weights, n_pairs, v_dim, BLOCK_P,
                                                         BLOCK_V)  # fmt: skip
    for entry in range(tl.program_id(0), tl.load(n_listed), tl.num_programs(0)):
        slot = tl.load(listed + entry).to(tl.int64)
        row, first, last = _bounds(starts, stops, row_ids, slot, SPARSE)
        value_row, m, v = _row_reads(values, state_a, state_b, row, col_mask, cols, v_dim,
                                     WEIGHT_GRAD or MODE == 2, ADAM and MODE == 2,
                                     STREAM)  # fmt: skip
        acc = _sum_pairs(grad_out, weights, order, wgrad, first, last, value_row, lanes, cols,
                         col_mask, picks, v_dim, WEIGHT_GRAD, BLOCK_P, BLOCK_V, STAGES,
                         KEEP)  # fmt: skip
        _finish_row(
            out, values, state_a, state_b, scale, slot, row, first, last, 1, acc, value_row, m,
            v, cols, col_mask, block, n_out, v_dim, lr, eps, beta1, beta2, decay, step_size,
            bc2_sqrt, inv_width, seed, MODE, ADAM, HAS_SCALE, STOCHASTIC, LOCAL_NORM, STREAM,
            OUT_BY_ROW,
        )  # fmt: skip


@triton.jit
def _chunk_rows_kernel(
    grad_out, weights, order, row_ids, chunk_slots, chunk_first, chunk_last, n_chunks, values,
    partial, grad_weights, n_pairs, picks, v_dim,
    SPARSE: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_V: tl.constexpr, STAGES: tl.constexpr, KEEP: tl.constexpr, STREAM: tl.constexpr,
):  # fmt: skip
    """Split rows, a chunk of pairs an entry: the chunk's gradient sum to partial[entry]
    (float32), its pairs' weight-gradient shares to grad_weights."""
    block, cols, col_mask, lanes, wgrad = _program_block(grad_weights, n_pairs, v_dim, BLOCK_P,
                                                         BLOCK_V)  # fmt: skip
    for entry in range(tl.program_id(0), tl.load(n_chunks), tl.num_programs(0)):
        row = _table_row(row_ids, tl.load(chunk_slots + entry).to(tl.int64), SPARSE)
        value_row, _, _ = _row_reads(values, values, values, row, col_mask, cols, v_dim,
                                     WEIGHT_GRAD, False, STREAM)  # fmt: skip
        acc = _sum_pairs(
            grad_out, weights, order, wgrad, tl.load(chunk_first + entry),
            tl.load(chunk_last + entry), value_row, lanes, cols, col_mask, picks, v_dim,
            WEIGHT_GRAD, BLOCK_P, BLOCK_V, STAGES, KEEP,
        )  # fmt: skip
        tl.store(partial + tl.cast(entry, tl.int64) * v_dim + cols, acc, mask=col_mask)


@triton.jit
def _combine_rows_kernel(
    starts, stops, row_ids, listed, n_listed, chunk_begin, chunk_count, partial, values, out,
    state_a, state_b, scale,
    n_out, v_dim, lr, eps, beta1, beta2, decay, step_size, bc2_sqrt, inv_width, seed,
    MODE: tl.constexpr, SPARSE: tl.constexpr, ADAM: tl.constexpr, HAS_SCALE: tl.constexpr,
    STOCHASTIC: tl.constexpr, LOCAL_NORM: tl.constexpr, BLOCK_V: tl.constexpr,
    STREAM: tl.constexpr, OUT_BY_ROW: tl.constexpr,
):  # fmt: skip
    """Split rows, one an entry: the sum of the row's chunks, in order (deterministic), then
    the row's end by MODE."""
    block = tl.program_id(1)
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_dim
    for entry in range(tl.program_id(0), tl.load(n_listed), tl.num_programs(0)):
        slot = tl.load(listed + entry).to(tl.int64)
        row, first, last = _bounds(starts, stops, row_ids, slot, SPARSE)
        begin = tl.load(chunk_begin + entry).to(tl.int64)
        acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for chunk in range(begin, begin + tl.load(chunk_count + entry)):
            acc += tl.load(partial + chunk * v_dim + cols, mask=col_mask, other=0.0)
        value_row, m, v = _row_reads(values, state_a, state_b, row, col_mask, cols, v_dim,
                                     MODE == 2, ADAM and MODE == 2, STREAM)  # fmt: skip
        _finish_row(
            out, values, state_a, state_b, scale, slot, row, first, last, 1, acc, value_row, m,
            v, cols, col_mask, block, n_out, v_dim, lr, eps, beta1, beta2, decay, step_size,
            bc2_sqrt, inv_width, seed, MODE, ADAM, HAS_SCALE, STOCHASTIC, LOCAL_NORM, STREAM,
            OUT_BY_ROW,
        )  # fmt: skip


class PassShape(NamedTuple):
    """The row pass's launch shape."""

    block_p: int  # pairs a row of the short-row kernel holds (BLOCK_P)
    block_v: int  # columns a program holds (BLOCK_V)
    warps: int
    rows_a_program: int
    stages: int  # of Triton's software pipeline
    # Rows of more pairs than this are summed in chunks of this many pairs by several
    # programs, then combined in order; 0: off (each long row one program's loop).
    split: int = 0
    # L2 eviction priorities: keep the output-gradient rows and weights, which many rows
    # gather (a column block's 33 MB at 1.3B-like, in a 50 MB L2), and let the value rows,
    # optimizer state and gradient rows, read or written once, go first. Triton 3.6 drops
    # the policy of a load it pipelines into an asynchronous copy (PTX for sm_90): there
    # only the stores (4.3 GB of gradient rows in the bag backward) carry it.
    l2_hints: bool = False
    # Keep the column block's output-gradient rows in L2's persisting set-aside while the
    # pass runs (`l2_residency.persisting`: works on asynchronous copies too).
    l2_window: bool = False
    # Walk the rows ordered by the first token that picked each (`rows_by_first_token`),
    # not by row: the rows sharing a first token then run together, and that token's
    # output-gradient row is gathered from L2 (the first pairs are 43% of the pairs at
    # 1.3B-like). Dense passes only (no row list).
    token_order: bool = False


def pass_blocks(v_dim: int, pairs_per_row: float, whole_rows: bool = False) -> PassShape:
    """The row pass's shape. BLOCK_P is twice the average pairs of a row: the rows with more
    (5% of them at two a row) go to the long-row kernel. Rows up to 1024 columns in one
    column block: narrower blocks ran 3.4x slower per halving on an H100 (GPU_NOTES.md).
    `whole_rows` (row-wise Adagrad: one pass, no norms pass) takes rows up to 2048 columns
    in one block of 8 warps: at the 1.3B-like config its fused step took 12.0 ms where two
    passes over blocks of 1024 columns took 22.4."""
    block_p = min(max(triton.next_power_of_2(int(2 * pairs_per_row)), 2), MAX_BLOCK_P)
    block_v = min(max(triton.next_power_of_2(max(v_dim, 1)), 16), _MAX_BLOCK_V)
    if whole_rows and _MAX_BLOCK_V < v_dim <= 2 * _MAX_BLOCK_V:
        return PassShape(block_p, 2 * _MAX_BLOCK_V, 8, _ROWS_PER_PROGRAM, _STAGES)
    return PassShape(block_p, block_v, 4, _ROWS_PER_PROGRAM, _STAGES)


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
    `optimizer_args` (state_a, state_b, scale and the kernels' scalars). With
    `weight_grad` (modes 0 and 2) returns the weight gradient, float32, shaped as `weights`."""
    if mode == 0 and out is None:
        raise ValueError("row_pass mode 0 writes the value gradient into `out`: pass one")
    v_dim = grad_out.shape[1]
    n_rows = offsets.shape[0] - 1
    n_out = n_rows if rows is None else rows.shape[0]
    n_pairs = order.numel()
    opt = dict(state_a=weights, state_b=weights, scale=weights, lr=0.0, eps=0.0, beta1=0.0,
               beta2=0.0, decay=1.0, step_size=0.0, bc2_sqrt=1.0, inv_width=1.0, seed=0,
               adam=False, has_scale=False, stochastic=False, local_norm=False,
               ) | (optimizer_args or {})  # fmt: skip
    shape = PassShape(*pass_blocks(v_dim, n_pairs / max(n_rows, 1), whole_rows=opt["local_norm"]))
    block_p, block_v, warps, stages = shape.block_p, shape.block_v, shape.warps, shape.stages
    split = max(shape.split, block_p) if shape.split else 0
    hints = dict(KEEP="evict_last", STREAM="evict_first") if shape.l2_hints else \
        dict(KEEP="", STREAM="")  # fmt: skip
    n_blocks = triton.cdiv(v_dim, block_v)
    device = grad_out.device
    if mode == 1:
        out = torch.zeros(n_blocks, n_out, dtype=torch.float32, device=device)
    shares = torch.zeros(n_blocks if weight_grad else 1, n_pairs if weight_grad else 1,
                         dtype=torch.float32, device=device)  # fmt: skip
    by_token = shape.token_order and rows is None and n_pairs > 0
    listed_rows = rows is not None or by_token  # the kernels read each entry's row
    if not listed_rows:
        starts, stops, row_ids = offsets[:-1], offsets[1:], offsets
    else:
        row_ids = rows_by_first_token(order, offsets, weights.shape[-1]) if by_token else \
            rows.to(torch.int64).contiguous()  # fmt: skip
        starts, stops = offsets[row_ids], offsets[row_ids + 1]
    if not (n_out and n_pairs):
        if mode == 0:
            out.zero_()  # no rows or no pairs: a zero gradient
        return _pass_result(mode, out, shares, weight_grad, n_blocks, weights)
    # Unused pointer arguments get a non-empty stand-in (a null pointer is refused on CUDA).
    tensors = dict(values=values, out=values if out is None else out, grad_weights=shares,
                   state_a=opt["state_a"], state_b=opt["state_b"], scale=opt["scale"])  # fmt: skip
    scalars = (n_out, n_pairs, weights.shape[-1], v_dim, opt["lr"], opt["eps"], opt["beta1"],
               opt["beta2"], opt["decay"], opt["step_size"], opt["bc2_sqrt"],
               opt["inv_width"], opt["seed"])  # fmt: skip
    meta = dict(MODE=mode, SPARSE=listed_rows, WEIGHT_GRAD=weight_grad, ADAM=opt["adam"],
                HAS_SCALE=opt["has_scale"], STOCHASTIC=opt["stochastic"],
                LOCAL_NORM=opt["local_norm"], BLOCK_P=block_p, BLOCK_V=block_v, STAGES=stages,
                OUT_BY_ROW=by_token, num_warps=warps, **hints)  # fmt: skip
    everything = (grad_out, weights, order, starts, stops, row_ids)
    # The column blocks run one after another (block is the grid's slower axis): one
    # block's share of the output-gradient rows is gathered at a time.
    window = l2_residency.persisting(grad_out, grad_out.numel() * grad_out.element_size()
                                     // n_blocks) if shape.l2_window else nullcontext()  # fmt: skip
    with window:
        _short_rows_kernel[(triton.cdiv(n_out, shape.rows_a_program), n_blocks)](
            *everything, *tensors.values(), *scalars, **meta, **COMPILE_OPTIONS
        )
        listed, n_listed, capacity = rows_between(starts, stops, block_p, split or None, n_pairs)
        if capacity:
            _long_rows_kernel[(min(capacity, _LONG_PROGRAMS), n_blocks)](
                *everything, listed, n_listed, *tensors.values(), *scalars, **meta,
                **COMPILE_OPTIONS,
            )  # fmt: skip
        split_rows = chunks(starts, stops, split, n_pairs) if split else None
        if split_rows:
            listed, n_listed, begin, count, chunk_slots, first, last, n_chunks = split_rows
            partial = torch.empty(first.shape[0], v_dim, dtype=torch.float32, device=device)
            _chunk_rows_kernel[(min(first.shape[0], _LONG_PROGRAMS), n_blocks)](
                grad_out, weights, order, row_ids, chunk_slots, first, last, n_chunks, values,
                partial, shares, n_pairs, weights.shape[-1], v_dim, SPARSE=listed_rows,
                WEIGHT_GRAD=weight_grad, BLOCK_P=block_p, BLOCK_V=block_v, STAGES=stages,
                num_warps=warps, **hints, **COMPILE_OPTIONS,
            )  # fmt: skip
            _combine_rows_kernel[(min(listed.shape[0], _LONG_PROGRAMS), n_blocks)](
                starts, stops, row_ids, listed, n_listed, begin, count, partial, values,
                tensors["out"], opt["state_a"], opt["state_b"], opt["scale"], n_out, v_dim,
                *scalars[4:], MODE=mode, SPARSE=listed_rows, ADAM=opt["adam"],
                HAS_SCALE=opt["has_scale"], STOCHASTIC=opt["stochastic"],
                LOCAL_NORM=opt["local_norm"], BLOCK_V=block_v, STREAM=hints["STREAM"],
                OUT_BY_ROW=by_token, num_warps=warps, **COMPILE_OPTIONS,
            )  # fmt: skip
    return _pass_result(mode, out, shares, weight_grad, n_blocks, weights)


def _pass_result(mode, out, shares, weight_grad, n_blocks, weights) -> torch.Tensor | None:
    if mode == 1:
        return out[0] if n_blocks == 1 else out.sum(0)
    if not weight_grad:
        return None
    return (shares[0] if n_blocks == 1 else shares.sum(0)).view(weights.shape)
