"""Triton kernels of `memcompile::pk_topk`: product-key top-k in two launches.

Scan: one program per (block of tokens, head, query half, slice of the sub-keys) scores
the half against its sub-keys block by block with `tl.dot`, keeping a running top-K of
(score, key) pairs packed into one sortable int64 (an order-preserving integer image of the
float32 score in the high half, the index in the low half). Each block's top-K joins the
running one by a bitonic merge of the two sorted lists (log2 K compare-and-swap passes over
K, where a second `tl.topk` of the 2K would re-sort both). Small batches split the sub-keys
over up to 16 slices so one token still spreads over many programs; large ones scan all
sub-keys in one slice.

Merge: one program per (token, head) takes each half's top-K over the slices (both halves
through one tree of pairwise merges, as a batch: at decode 1,288 SASS instructions against
2,640 for a tree each, Triton 3.6, not yet timed), then ranks only the candidate sums that
can be in the top-K: with both halves sorted, pair (i, j) is beaten by the
(i + 1)(j + 1) - 1 pairs (i' <= i, j' <= j), so only (i + 1)(j + 1) <= K count. They are
covered by K log2(K) + 1 slots (rows [2^b - 1, 2^(b+1) - 1) by columns [0, K / 2^b)), 256
at K = 32 where all pairs are 1024. One token per merge program keeps
the sort in registers. K is knn rounded up to a power of two (tl.topk's requirement); the
extra candidates never change the exact top-knn. With `softmax=True` the merge stores each
head's softmax over its knn scores instead (the lookup's weights), which saves the
inference path a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_previous_kernel
from .triton_options import COMPILE_OPTIONS


@triton.jit
def _pack(score, index):
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (index.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _unpack(key):
    high = (key >> 32).to(tl.int32)
    score = (high ^ ((high >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return score, key & 0xFFFFFFFF


@triton.jit
def _exchange(h, axis: tl.constexpr):
    """Each element's partner along a size-2 axis of a hypercube-shaped tensor."""
    return h ^ tl.xor_sum(h, axis, keep_dims=True)


@triton.jit
def _merge_sorted(a, b, LOG_K: tl.constexpr):
    """The top K of two rows of K packed keys, each sorted descending, sorted descending.

    max(a[i], b[K - 1 - i]) holds the top K of both and is bitonic (Batcher's half
    cleaner); log2 K compare-and-swap passes sort it. Rows live on the hypercube
    (BLOCK_N, 2, ..., 2), where axis 1 + t is bit LOG_K - 1 - t of the column."""
    shape: tl.constexpr = [a.shape[0]] + [2] * LOG_K
    h = tl.reshape(tl.maximum(a, tl.flip(b, 1)), shape)
    for axis in tl.static_range(1, LOG_K + 1):
        right = tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (LOG_K - axis)) == 1
        partner = _exchange(h, axis)
        h = tl.where(right, tl.minimum(h, partner), tl.maximum(h, partner))
    return tl.reshape(h, a.shape)


@triton.jit
def _half_topk(
    q, keys, tokens, token_mask, head, half, heads, n_keys, key_start, key_stop,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K: tl.constexpr, LOG_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Packed top-K of one query half against sub-keys [key_start, key_stop), sorted
    descending."""
    dims = tl.arange(0, HALF_P)
    dim_mask = dims < HALF
    q_ptrs = q + (tokens[:, None] * heads + head) * (2 * HALF) + half * HALF + dims[None, :]
    qh = tl.load(q_ptrs, mask=token_mask[:, None] & dim_mask[None, :], other=0.0)
    key_base = keys + ((head * 2 + half) * n_keys).to(tl.int64) * HALF
    best = _pack(tl.full((BLOCK_N, K), float("-inf"), tl.float32), tl.zeros((BLOCK_N, K), tl.int64))
    for start in range(key_start, key_stop, BLOCK_K):
        rows = start + tl.arange(0, BLOCK_K)
        row_mask = rows < key_stop
        kt = tl.load(key_base + rows[:, None] * HALF + dims[None, :],
                     mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # fmt: skip
        if BLOCK_N >= 16:
            scores = tl.dot(qh, tl.trans(kt), input_precision=PRECISION)
        else:  # decode: a few rows, no matrix tile to fill; the same fp32 sums of products
            scores = tl.sum(qh.to(tl.float32)[:, None, :] * kt.to(tl.float32)[None, :, :], 2)
        scores = tl.where(row_mask[None, :], scores, float("-inf"))
        packed = _pack(scores, tl.broadcast_to(rows[None, :], (BLOCK_N, BLOCK_K)))
        best = _merge_sorted(best, tl.topk(packed, K), LOG_K)
    return best


@triton.jit
def _store_final(
    best1, best2, scores_out, indices_out, token, head, heads, n_keys, knn,
    K: tl.constexpr, LOG_K: tl.constexpr, CANDIDATES: tl.constexpr, SOFTMAX: tl.constexpr,
):  # fmt: skip
    """The top-knn (or its softmax) of the candidate sums of both halves' sorted top-K (one
    token's, 1-D: Triton 3.6 cannot compile this gather in 2-D), stored. Slot c of group
    b = c // K is row 2^b - 1 + (c % K) // (K >> b), column (c % K) % (K >> b); group
    log2 K holds only (K - 1, 0)."""
    slots = tl.arange(0, CANDIDATES)
    group = tl.minimum(slots >> LOG_K, LOG_K)
    within = slots & (K - 1)
    pair_rows = tl.minimum((1 << group) - 1 + (within >> (LOG_K - group)), K - 1)
    pair_cols = within & ((K >> group) - 1)
    s1, i1 = _unpack(tl.gather(best1, pair_rows, 0))
    s2, i2 = _unpack(tl.gather(best2, pair_cols, 0))
    sums = tl.where(slots < K * LOG_K + 1, s1 + s2, float("-inf"))
    scores, indices = _unpack(tl.topk(_pack(sums, i1 * n_keys + i2), K))
    cols = tl.arange(0, K)
    live = cols < knn
    if SOFTMAX:
        scores = tl.where(live, scores, float("-inf"))
        scores = tl.exp(scores - tl.max(scores, axis=0))
        scores = scores / tl.sum(scores, axis=0)
    out = (token * heads + head) * knn + cols
    tl.store(scores_out + out, scores, mask=live)
    tl.store(indices_out + out, indices, mask=live)


@triton.jit
def _split_topk_kernel(
    q, keys, partial, n_tokens, heads, n_keys, keys_per_split,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K: tl.constexpr, LOG_K: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Each program scores one (head, half) of a token block against one slice of the
    sub-keys and stores that slice's packed top-K, sorted descending."""
    wait_for_previous_kernel(PDL)
    head_half = tl.program_id(1)
    split = tl.program_id(2)
    tokens = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    token_mask = tokens < n_tokens
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, n_keys)
    best = _half_topk(q, keys, tokens, token_mask, head_half // 2, head_half % 2, heads, n_keys,
                      start, stop, HALF, HALF_P, BLOCK_N, BLOCK_K, K, LOG_K, PRECISION)  # fmt: skip
    cols = tl.arange(0, K)
    out = ((tokens[:, None] * heads * 2 + head_half) * SPLITS + split) * K + cols[None, :]
    tl.store(partial + out, best, mask=token_mask[:, None])


@triton.jit
def _merge_slices(lists, K: tl.constexpr, LOG_K: tl.constexpr, SPLITS: tl.constexpr):
    """Each half's top K, sorted, of its SPLITS sorted lists of K: both halves' lists laid
    end to end (half 1's, then half 2's). A tree of pairwise bitonic merges (the lists are
    sorted, so a topk's sort of them would be wasted); the halves go through it together,
    as one batch, so the merge waits for one tree, not two."""
    lists = tl.reshape(lists, (2 * SPLITS, K))
    for _ in tl.static_range(SPLITS.bit_length() - 1):
        pairs = tl.permute(tl.reshape(lists, (lists.shape[0] // 2, 2, K)), (0, 2, 1))
        first, second = tl.split(pairs)
        lists = _merge_sorted(first, second, LOG_K)
    return tl.split(tl.permute(lists, (1, 0)))


@triton.jit
def _merge_splits_kernel(
    partial, scores_out, indices_out, heads, n_keys, knn,
    K: tl.constexpr, LOG_K: tl.constexpr, SPLITS: tl.constexpr, CANDIDATES: tl.constexpr,
    SOFTMAX: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (token, head): each half's top-K over the slices, then the top-knn
    of the candidate sums."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = (token * heads * 2 + head * 2) * SPLITS * K
    if SPLITS == 1:  # training, prefill: each half's list is its top K
        best1 = tl.load(partial + base + tl.arange(0, K))
        best2 = tl.load(partial + base + K + tl.arange(0, K))
    else:
        best1, best2 = _merge_slices(tl.load(partial + base + tl.arange(0, 2 * SPLITS * K)), K,
                                     LOG_K, SPLITS)  # fmt: skip
    _store_final(best1, best2, scores_out, indices_out, token, head, heads, n_keys, knn, K,
                 LOG_K, CANDIDATES, SOFTMAX)  # fmt: skip


# Below this many (token block, head) pairs, the sub-key scan is split across programs.
_SPLIT_BELOW_PROGRAMS = 64
# Bytes of sub-keys one scan step holds. 32 KB keeps the scan free of register spills and
# its pipelined shared memory under an H100 block's 227 KB (ptxas for sm_90, Triton 3.6:
# fp32 at 64 KB spilled 6 KB a thread; bf16 at 64 KB spilled too). A step holds at least K
# sub-keys: past 64 KB (fp32, half width 512, knn 64: 288 KB of shared memory) it no
# longer fits, and `supports` sends the shape to the reference.
_KEY_TILE_BYTES = 32 * 1024
_MAX_KEY_TILE_BYTES = 64 * 1024
# From this many tokens the scan takes 64 tokens a program (`scan_blocks`).
_WIDE_SCAN_TOKENS = 2048


def supports(half: int, knn: int, element_size: int) -> bool:
    """Whether the scan's smallest step (K sub-keys of `half` elements) fits."""
    k = max(16, triton.next_power_of_2(knn))
    return k * max(16, triton.next_power_of_2(half)) * element_size <= _MAX_KEY_TILE_BYTES


def scan_blocks(n: int, n_keys: int, half_p: int, k: int, element_size: int):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the sub-key scan: tokens and sub-keys a
    step, and the depth of its key-tile pipeline."""
    # The scan's cost is its sorts, not its loads: a 64-token program sorts with half the
    # instructions per (token, key) of a 16-token one (SASS for sm_90, Triton 3.6,
    # 1.3B-like bf16: 4.6 against 8.6), and one or two pipeline stages keep its shared
    # memory at 48-64 KB, so 3 or 4 programs share an SM (3 stages: 80 KB at 16 tokens,
    # 2 programs). 16 tokens (tl.dot's minimum rows before Triton 3.5) where 64 would
    # leave SMs idle. Decode scans one token a program without tl.dot, whose 16 rows would
    # sort 15 masked ones (912 instructions a thread in 8 warps against 1,344), in narrow
    # steps, so its slices stay short. Not yet timed on a GPU.
    widest = 32 if n < 16 else 128
    fits = _KEY_TILE_BYTES // (half_p * element_size)
    block_k = max(k, 16, min(widest, fits, triton.next_power_of_2(n_keys)))
    if n < 16:
        return 1, block_k, 8, 2
    if n >= _WIDE_SCAN_TOKENS and k <= 32 and element_size <= 2:  # fp32 spills at 64
        return 64, block_k, 4, 1
    return 16, block_k, 4, 2


def split_scan(programs: int, n_keys: int, block_k: int) -> tuple[int, int]:
    """(SPLITS, num_warps of the merge): slices of the sub-keys, so that a few tokens'
    `programs` (token blocks x heads) still spread over many SMs, and the merge's warps.
    One warp a merge program without slices (training, prefill): its 256 candidates fill a
    warp, and per program it runs 1,096 warp instructions against 2,624 in 4 warps (SASS,
    K = 32). Decode's few programs, each reducing 16 slices, take 4 for latency."""
    if programs >= _SPLIT_BELOW_PROGRAMS:
        return 1, 1
    return min(16, triton.next_power_of_2(triton.cdiv(n_keys, block_k))), 4


def pk_topk(
    q: torch.Tensor, keys: torch.Tensor, knn: int, softmax: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (float32) and indices (int64), (N, heads, knn), as `reference.pk_topk`; with
    `softmax`, each head's softmax over its scores in place of the scores."""
    q, keys = q.contiguous(), keys.to(q.dtype).contiguous()
    n, heads, k_dim = q.shape
    n_keys, half = keys.shape[2], keys.shape[3]
    scores = torch.empty(n, heads, knn, dtype=torch.float32, device=q.device)
    indices = torch.empty(n, heads, knn, dtype=torch.int64, device=q.device)
    if n == 0:
        return scores, indices
    k = max(2, triton.next_power_of_2(knn))  # Triton 3.6's tl.topk fails to compile k = 1
    log_k = k.bit_length() - 1
    half_p = max(16, triton.next_power_of_2(half))
    block_n, block_k, warps, stages = scan_blocks(n, n_keys, half_p, k, q.element_size())
    token_blocks = triton.cdiv(n, block_n)
    splits, merge_warps = split_scan(token_blocks * heads, n_keys, block_k)
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, splits), block_k) * block_k
    partial = torch.empty(n, heads, 2, splits, k, dtype=torch.int64, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    dependent = pdl.use_pdl(q.device, token_blocks * heads * 2 * splits)  # decode: a few programs
    _split_topk_kernel[(token_blocks, heads * 2, splits)](
        q, keys, partial, n, heads, n_keys, keys_per_split, HALF=half, HALF_P=half_p,
        BLOCK_N=block_n, BLOCK_K=block_k, K=k, LOG_K=log_k, SPLITS=splits,
        PRECISION=precision, PDL=dependent, num_warps=warps, num_stages=stages,
        launch_pdl=dependent, **COMPILE_OPTIONS,
    )  # fmt: skip
    dependent = pdl.use_pdl(q.device, n * heads)
    _merge_splits_kernel[(n, heads)](
        partial, scores, indices, heads, n_keys, knn, K=k, LOG_K=log_k, SPLITS=splits,
        CANDIDATES=triton.next_power_of_2(k * log_k + 1), SOFTMAX=softmax, PDL=dependent,
        num_warps=merge_warps, launch_pdl=dependent, **COMPILE_OPTIONS,
    )  # fmt: skip
    return scores, indices
