"""Triton kernel of `memcompile::linears` for a few tokens: linear maps of one input, two a
launch.

At decode a projection is a matrix-vector product that only streams its weight. cuBLAS
ran each of a memory layer's 2048 x 2048 bf16 projections at about half the copy
bandwidth on an H100 (5.9 us for 8 MB, 2026-11-27), and the query and gate projections
read the same input: one launch can stream both. Each program computes BLOCK_O outputs of
one map for all the tokens, a (16, BLOCK_I) input tile (rows past N masked) times a
(BLOCK_O, BLOCK_I) weight tile with tl.dot, over d_in in steps that Triton's pipeliner
overlaps (asynchronous copies to shared memory). The first map's blocks come first in the
grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_previous_kernel
from .triton_options import COMPILE_OPTIONS

# tl.dot's fewest rows: the input tile holds this many tokens, the extra ones masked.
MAX_TOKENS = 16


# Values the two maps' branches choose between must keep one type: Triton would make a 1
# a constant in one branch and leave an integer in the other.
@triton.jit(do_not_specialize=["d_out_a", "d_out_b", "bias_in_a", "bias_in_b"])
def _linears_kernel(
    x, weight_a, bias_a, out_a, weight_b, bias_b, out_b,
    n, d_in, d_out_a, d_out_b, blocks_a, bias_in_a, bias_in_b,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    STAGES: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(PDL)
    block = tl.program_id(0)
    if block < blocks_a:
        weight, bias, out, d_out, has_bias = weight_a, bias_a, out_a, d_out_a, bias_in_a
    else:
        weight, bias, out, d_out, has_bias = weight_b, bias_b, out_b, d_out_b, bias_in_b
        block -= blocks_a
    outs = block * BLOCK_O + tl.arange(0, BLOCK_O)
    out_mask = outs < d_out
    tokens = tl.arange(0, BLOCK_N)
    token_mask = tokens < n
    weight_rows = weight + outs[:, None].to(tl.int64) * d_in
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for start in tl.range(0, d_in, BLOCK_I, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK_I)
        col_mask = cols < d_in
        xt = tl.load(x + tokens[:, None] * d_in + cols[None, :],
                     mask=token_mask[:, None] & col_mask[None, :], other=0.0)  # fmt: skip
        wt = tl.load(weight_rows + cols[None, :], mask=out_mask[:, None] & col_mask[None, :],
                     other=0.0)  # fmt: skip
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    if has_bias:
        acc += tl.load(bias + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out + tokens[:, None] * d_out + outs[None, :], acc.to(out.dtype.element_ty),
             mask=token_mask[:, None] & out_mask[None, :])  # fmt: skip


def linear_blocks(d_in: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_I, num_warps, num_stages): 16 outputs a program, so a 2048-wide
    map spreads over 128 programs, about one an SM of an H100, and 8 KB weight tiles four
    deep, so a program keeps 32 KB of loads in flight. Not yet timed on a GPU."""
    block_i = max(16, min(8192 // (16 * element_size), triton.next_power_of_2(d_in)))
    return 16, block_i, 4, 4


def linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """[x @ w.T + b for each map], x (N <= MAX_TOKENS, d_in >= 1); weights, biases and x
    of one dtype; maps two a launch."""
    x = x.contiguous()
    n, d_in = x.shape
    outs = [x.new_empty(n, w.shape[0]) for w in weights]
    if n == 0:
        return outs
    block_o, block_i, warps, stages = linear_blocks(d_in, x.element_size())
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    maps = list(zip(weights, biases, outs))
    for first in range(0, len(maps), 2):
        pair = maps[first : first + 2]
        (w_a, b_a, y_a), (w_b, b_b, y_b) = pair[0], pair[-1]
        blocks_a = triton.cdiv(w_a.shape[0], block_o)
        blocks_b = triton.cdiv(w_b.shape[0], block_o) if len(pair) == 2 else 0
        dependent = pdl.use_pdl(x.device, blocks_a + blocks_b)
        _linears_kernel[(blocks_a + blocks_b,)](
            x, w_a.contiguous(), y_a if b_a is None else b_a.contiguous(), y_a,
            w_b.contiguous(), y_b if b_b is None else b_b.contiguous(), y_b,
            n, d_in, w_a.shape[0], w_b.shape[0], blocks_a, int(b_a is not None),
            int(b_b is not None), BLOCK_N=MAX_TOKENS, BLOCK_O=block_o, BLOCK_I=block_i,
            STAGES=stages, PRECISION=precision, PDL=dependent, num_warps=warps,
            launch_pdl=dependent, **COMPILE_OPTIONS,
        )  # fmt: skip
    return outs
