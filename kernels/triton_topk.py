"""Triton kernels of `memcompile::pk_topk`: product-key top-k in two launches.

Scan: one program per (block of tokens, head, query half, slice of the sub-keys) scores
the half against its sub-keys block by block with `tl.dot`, keeping a running top-K of
(score, key) pairs packed into one sortable int64 (an order-preserving integer image of the
float32 score in the high half, the index in the low half). Small batches split the
sub-keys over up to 16 slices so one token still spreads over many programs; large ones
scan all sub-keys in one slice.

Merge: one program per (token, head) takes each half's top-K over the slices, then the
K x K candidate sums and their top-K. One token per merge program keeps the K x K sort
in registers (no spills at K = 32, about 100 bytes a thread at K = 64). K is knn rounded
up to a power of two (tl.topk's requirement); the extra candidates never change the exact
top-knn. With `softmax=True` the merge stores each head's softmax over its knn scores
instead (the lookup's weights), which saves the inference path a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _half_topk(
    q, keys, tokens, token_mask, head, half, heads, n_keys, key_start, key_stop,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Packed top-K of one query half against sub-keys [key_start, key_stop)."""
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
        scores = tl.dot(qh, tl.trans(kt), input_precision=PRECISION)
        scores = tl.where(row_mask[None, :], scores, float("-inf"))
        packed = _pack(scores, tl.broadcast_to(rows[None, :], (BLOCK_N, BLOCK_K)))
        block_best = tl.topk(packed, K)
        both = tl.reshape(tl.join(best, block_best), (BLOCK_N, 2 * K))
        best = tl.topk(both, K)
    return best


@triton.jit
def _store_final(
    best1, best2, scores_out, indices_out, tokens, token_mask, head, heads, n_keys, knn,
    BLOCK_N: tl.constexpr, K: tl.constexpr, SOFTMAX: tl.constexpr,
):  # fmt: skip
    """The K x K candidate sums of both halves' top-K, their top-knn (or its softmax),
    stored."""
    s1, i1 = _unpack(best1)
    s2, i2 = _unpack(best2)
    sums = tl.reshape(s1[:, :, None] + s2[:, None, :], (BLOCK_N, K * K))
    ids = tl.reshape(i1[:, :, None] * n_keys + i2[:, None, :], (BLOCK_N, K * K))
    scores, indices = _unpack(tl.topk(_pack(sums, ids), K))
    cols = tl.arange(0, K)
    live = cols[None, :] < knn
    if SOFTMAX:
        scores = tl.where(live, scores, float("-inf"))
        scores = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        scores = scores / tl.sum(scores, axis=1)[:, None]
    out = (tokens[:, None] * heads + head) * knn + cols[None, :]
    mask = token_mask[:, None] & live
    tl.store(scores_out + out, scores, mask=mask)
    tl.store(indices_out + out, indices, mask=mask)


@triton.jit
def _split_topk_kernel(
    q, keys, partial, n_tokens, heads, n_keys, keys_per_split,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Each program scores one (head, half) of a token block against one slice of the
    sub-keys and stores that slice's packed top-K."""
    head_half = tl.program_id(1)
    split = tl.program_id(2)
    tokens = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    token_mask = tokens < n_tokens
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, n_keys)
    best = _half_topk(q, keys, tokens, token_mask, head_half // 2, head_half % 2, heads, n_keys,
                      start, stop, HALF, HALF_P, BLOCK_N, BLOCK_K, K, PRECISION)  # fmt: skip
    cols = tl.arange(0, K)
    out = ((tokens[:, None] * heads * 2 + head_half) * SPLITS + split) * K + cols[None, :]
    tl.store(partial + out, best, mask=token_mask[:, None])


@triton.jit
def _merge_splits_kernel(
    partial, scores_out, indices_out, n_tokens, heads, n_keys, knn,
    BLOCK_N: tl.constexpr, K: tl.constexpr, SPLITS: tl.constexpr, SOFTMAX: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    tokens = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    token_mask = tokens < n_tokens
    cols = tl.arange(0, SPLITS * K)
    base = (tokens[:, None] * heads * 2 + head * 2) * SPLITS * K + cols[None, :]
    best1 = tl.topk(tl.load(partial + base, mask=token_mask[:, None], other=0), K)
    best2 = tl.topk(tl.load(partial + base + SPLITS * K, mask=token_mask[:, None], other=0), K)
    _store_final(best1, best2, scores_out, indices_out, tokens, token_mask, head, heads,
                 n_keys, knn, BLOCK_N, K, SOFTMAX)  # fmt: skip


# Below this many (token block, head) pairs, the sub-key scan is split across programs.
_SPLIT_BELOW_PROGRAMS = 64
# Bytes of sub-keys one scan step holds. 32 KB keeps the scan free of register spills and
# its pipelined shared memory under an H100 block's 227 KB (ptxas for sm_90, Triton 3.6:
# fp32 at 64 KB spilled 6 KB a thread; bf16 at 64 KB spilled too). A step holds at least K
# sub-keys: past 64 KB (fp32, half width 512, knn 64: 288 KB of shared memory) it no
# longer fits, and `supports` sends the shape to the reference.
_KEY_TILE_BYTES = 32 * 1024
_MAX_KEY_TILE_BYTES = 64 * 1024


def supports(half: int, knn: int, element_size: int) -> bool:
    """Whether the scan's smallest step (K sub-keys of `half` elements) fits."""
    k = max(16, triton.next_power_of_2(knn))
    return k * max(16, triton.next_power_of_2(half)) * element_size <= _MAX_KEY_TILE_BYTES


def scan_blocks(n: int, n_keys: int, half_p: int, k: int, element_size: int):
    """(BLOCK_N, BLOCK_K, num_warps) of the sub-key scan: tokens and sub-keys a step."""
    # 16 tokens a scan program, tl.dot's minimum rows before Triton 3.5 (a decode token
    # fills one; the matrix unit's tile has 16 rows or more anyway). Decode scans in narrow
    # steps, so its slices stay short.
    widest = 32 if n < 16 else 128
    fits = _KEY_TILE_BYTES // (half_p * element_size)
    return 16, max(k, 16, min(widest, fits, triton.next_power_of_2(n_keys))), 4


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
    half_p = max(16, triton.next_power_of_2(half))
    block_n, block_k, warps = scan_blocks(n, n_keys, half_p, k, q.element_size())
    token_blocks = triton.cdiv(n, block_n)
    splits = 1
    if token_blocks * heads < _SPLIT_BELOW_PROGRAMS:
        splits = min(16, triton.next_power_of_2(triton.cdiv(n_keys, block_k)))
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, splits), block_k) * block_k
    partial = torch.empty(n, heads, 2, splits, k, dtype=torch.int64, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_topk_kernel[(token_blocks, heads * 2, splits)](
        q, keys, partial, n, heads, n_keys, keys_per_split, HALF=half, HALF_P=half_p,
        BLOCK_N=block_n, BLOCK_K=block_k, K=k, SPLITS=splits, PRECISION=precision,
        num_warps=warps,
    )  # fmt: skip
    _merge_splits_kernel[(n, heads)](
        partial, scores, indices, n, heads, n_keys, knn, BLOCK_N=1, K=k, SPLITS=splits,
        SOFTMAX=softmax,
    )  # fmt: skip
    return scores, indices
