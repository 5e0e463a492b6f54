"""The backward of `memcompile::pk_topk` on a GPU: one Triton launch and two batched matmuls.

A pick's score is the sum of its two sub-key scores, so the score gradient of sub-key i of
a half is the sum of the gradients of the token's picks that use i. Those sums form a
dense (heads x 2, N, n_keys) matrix G, about 3% filled at the 1.3B-like config (32 picks
of 1024 sub-keys), and the gradients are two products of it:
grad_q_half = G @ sub_keys and grad_sub_keys = G^T @ q_half, which cuBLAS runs near its
peak. The reference builds G in float32 (a fill, an atomic scatter, a cast) and lets
einsum permute it; here one kernel writes it in the matmul dtype with each sum computed
in registers (the picks' duplicates combined in float32, so the result does not depend on
the order of atomics), in the layout the batched matmuls take without copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_options import COMPILE_OPTIONS


@triton.jit
def _sub_key_grad_kernel(
    grad_scores, indices, grad_sub, n_tokens, n_keys, knn,
    stride_gn, stride_gh, stride_gk, stride_in, stride_ih, stride_ik,
    BLOCK_N: tl.constexpr, K: tl.constexpr,
):  # fmt: skip
    """One program per (token block, head, half): each token's pick gradients summed per
    sub-key of this half and stored at G[head * 2 + half, token, sub-key] (G is zero)."""
    head, half = tl.program_id(1), tl.program_id(2)
    tokens = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    picks = tl.arange(0, K)
    live = (tokens < n_tokens)[:, None] & (picks < knn)[None, :]
    row = tl.load(indices + tokens[:, None] * stride_in + head * stride_ih
                  + picks[None, :] * stride_ik, mask=live, other=0)  # fmt: skip
    grad = tl.load(grad_scores + tokens[:, None] * stride_gn + head * stride_gh
                   + picks[None, :] * stride_gk, mask=live, other=0.0).to(tl.float32)  # fmt: skip
    sub = tl.where(half == 0, row // n_keys, row % n_keys)
    # (BLOCK_N, K, K): pick p against every pick p' of its token.
    same = (sub[:, :, None] == sub[:, None, :]) & live[:, None, :]
    total = tl.sum(tl.where(same, grad[:, None, :], 0.0), axis=2)
    earlier = same & (picks[None, None, :] < picks[None, :, None])
    first = live & (tl.sum(earlier.to(tl.int32), axis=2) == 0)
    rows = (head * 2 + half) * n_tokens + tokens
    out = grad_sub + rows[:, None] * n_keys + sub
    tl.store(out, total.to(grad_sub.dtype.element_ty), mask=first)


def pk_topk_backward(
    grad_scores: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `pk_topk`'s scores (N, heads, knn) with respect to q (N, heads, k_dim)
    and keys (heads, 2, n_keys, k_dim / 2), as `reference.pk_topk_backward`; both contiguous,
    in q's and keys' dtypes."""
    n, heads, k_dim = q.shape
    n_keys, half = keys.shape[2], keys.shape[3]
    knn = indices.shape[2]
    mm = reference.matmul_dtype(q.dtype)
    grad_sub = torch.zeros(heads * 2, n, n_keys, dtype=mm, device=q.device)
    if n:
        block_n = 4  # a (4, K, K) comparison tile: 4,096 elements at knn 32, 4 warps
        _sub_key_grad_kernel[(triton.cdiv(n, block_n), heads, 2)](
            grad_scores, indices, grad_sub, n, n_keys, knn, *grad_scores.stride(),
            *indices.stride(), BLOCK_N=block_n, K=max(2, triton.next_power_of_2(knn)),
            num_warps=4, **COMPILE_OPTIONS,
        )  # fmt: skip
    sub_keys = keys.to(mm).reshape(heads * 2, n_keys, half)
    grad_halves = torch.bmm(grad_sub, sub_keys)  # (heads x 2, N, half)
    grad_q = grad_halves.view(heads, 2, n, half).permute(2, 0, 1, 3).reshape(n, heads, k_dim)
    q_halves = q.to(mm).reshape(n, heads * 2, half).transpose(0, 1)  # (heads x 2, N, half)
    grad_keys = torch.bmm(grad_sub.transpose(1, 2), q_halves).view(heads, 2, n_keys, half)
    return grad_q.to(q.dtype), grad_keys.to(keys.dtype)
