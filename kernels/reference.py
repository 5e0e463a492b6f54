"""Plain-PyTorch implementations of the memory-layer ops, for any device.

They are the default kernels of `memcompile::pk_topk`, `memcompile::bag`,
`memcompile::pk_lookup` and `memcompile::linears`, and the reference the Triton kernels are
tested against. Large intermediates are processed in chunks of tokens so CPU memory stays
bounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of the (tokens, picks, v_dim) gather materialised at once by `bag`.
_BAG_CHUNK_ELEMENTS = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _token_chunk(picks: int, width: int) -> int:
    return max(1, _BAG_CHUNK_ELEMENTS // max(1, picks * width))


def half_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Every query half against its sub-keys: (2H, N, n_keys) in the accumulation dtype,
    row h*2 + s for head h's half s. q: (N, H, k_dim); keys: (H, 2, n_keys, k_dim/2)."""
    acc = accumulation_dtype(q.dtype)
    n, heads, _ = q.shape
    n_keys, half = keys.shape[2], keys.shape[3]
    # One batched product, the query on the left: (2H, N, half) @ (2H, half, n_keys). At one
    # token the CPU's BLAS runs this order 2.5x faster than keys @ query.
    sub_keys = keys.to(acc).reshape(heads * 2, n_keys, half)
    halves = q.to(acc).reshape(n, heads * 2, half).transpose(0, 1)
    return torch.bmm(halves, sub_keys.transpose(1, 2))


def pk_topk(q: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key top-knn. q: (N, H, k_dim); keys: (H, 2, n_keys, k_dim/2).

    Returns scores (N, H, knn), sorted descending, and indices i*n_keys + j into the
    n_keys**2 rows.
    """
    n, heads, _ = q.shape
    n_keys = keys.shape[2]
    best, best_ids = half_scores(q, keys).topk(knn, dim=-1)
    best, best_ids = best.view(heads, 2, n, knn), best_ids.view(heads, 2, n, knn)
    candidates = (best[:, 0, :, :, None] + best[:, 1, :, None, :]).flatten(-2)
    candidate_ids = (best_ids[:, 0, :, :, None] * n_keys + best_ids[:, 1, :, None, :]).flatten(-2)
    top, picked = candidates.topk(knn, dim=-1)  # (H, N, knn)
    return top.transpose(0, 1).contiguous(), candidate_ids.gather(-1, picked).transpose(
        0, 1
    ).contiguous()


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of pk_topk's backward matmuls: a half-precision layer's own (with float32
    accumulation, as a bf16 layer's backward does: an H100's float32 matmuls run at a tenth
    of the speed), else the accumulation dtype."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else accumulation_dtype(dtype)


def pk_topk_backward(
    grad_scores: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `pk_topk`'s scores with respect to q and keys: each half's score
    gradient scattered (summed in float32) over its sub-keys, then two matmuls."""
    acc = accumulation_dtype(q.dtype)
    matmul = matmul_dtype(q.dtype)
    n_keys, half = keys.shape[2], keys.shape[3]
    grad_scores = grad_scores.to(acc)
    grad_halves = []
    for sub_index in (indices // n_keys, indices % n_keys):
        grad_s = grad_scores.new_zeros(*grad_scores.shape[:2], n_keys)
        grad_halves.append(grad_s.scatter_add_(-1, sub_index, grad_scores).to(matmul))
    q1, q2 = q.to(matmul).split(half, dim=-1)
    keys_mm = keys.to(matmul)
    grad_q = torch.cat(
        [torch.einsum("nhk,hkd->nhd", g, keys_mm[:, s]) for s, g in enumerate(grad_halves)],
        dim=-1,
    )
    grad_keys = torch.stack(
        [torch.einsum("nhk,nhd->hkd", g, qh) for g, qh in zip(grad_halves, (q1, q2))], dim=1
    )
    return grad_q.to(q.dtype), grad_keys.to(keys.dtype)


def bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[n] = sum_b weights[n, b] * values[indices[n, b]], accumulated in float32 (or float64).

    values: (rows, v_dim); indices, weights: (N, B). Returns (N, v_dim) in values.dtype.
    """
    acc = accumulation_dtype(values.dtype)
    if values.dtype == acc and values.device.type == "cpu":
        # float32/float64 tables accumulate in their own dtype: embedding_bag's fused loop.
        return F.embedding_bag(indices, values, mode="sum", per_sample_weights=weights.to(acc))
    n, picks = indices.shape
    out = values.new_empty(n, values.shape[1])
    step = _token_chunk(picks, values.shape[1])
    for start in range(0, n, step):
        rows = values[indices[start : start + step]].to(acc)
        w = weights[start : start + step].to(acc).unsqueeze(1)
        out[start : start + step] = torch.bmm(w, rows).squeeze(1).to(values.dtype)
    return out


def pk_lookup(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    knn: int,
    swilu: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole lookup: `pk_topk`, a softmax over each head's knn scores (in the scores'
    float32, float64 for float64 inputs) and the `bag` of all heads' picks: (N, v_dim) on
    q's device; with `swilu`, that bag times silu(swilu), in swilu's dtype."""
    picks = q.shape[1] * knn
    scores, indices = pk_topk(q, keys, knn)
    probs = torch.softmax(scores, dim=-1)
    # Values on another device than q (host-resident): summed where they live, and only the
    # (N, v_dim) result crosses.
    indices, probs = indices.view(-1, picks).to(values.device), probs.view(-1, picks)
    out = bag(values, indices, probs.to(values.device)).to(q.device)
    return out if swilu is None else silu_gate(out, swilu)


def silu_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * silu(gate), in gate's dtype, contiguous: the Memory+ gating of the bag."""
    return (x.to(gate.dtype) * F.silu(gate)).contiguous()


def silu_gate_backward(
    grad: torch.Tensor, x: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `silu_gate` with respect to x and gate, computed in float32 (float64
    for float64) and rounded once to x's and gate's dtypes; contiguous."""
    acc = accumulation_dtype(gate.dtype)
    d, a, g = grad.to(acc), x.to(acc), gate.to(acc)
    s = torch.sigmoid(g)
    grad_x = (d * g * s).to(x.dtype).contiguous()
    return grad_x, (d * a * s * (1 + g * (1 - s))).to(gate.dtype).contiguous()


def bag_backward_rows(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`bag_backward` for the value rows `rows` only (sorted, distinct, every picked row
    among them), in that order: the row-sparse value gradient, and the weights' gradient.
    Works on the picked rows alone, as if the table held nothing else."""
    return bag_backward(grad_out, values[rows], torch.searchsorted(rows, indices), weights)


def linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """[x @ w.T + b for each (w, b)]."""
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


def bag_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `bag` with respect to values (dense) and weights."""
    acc = accumulation_dtype(values.dtype)
    n, picks = indices.shape
    v_dim = values.shape[1]
    grad_values = torch.zeros(values.shape, dtype=acc, device=values.device)
    grad_weights = torch.empty(n, picks, dtype=acc, device=values.device)
    step = _token_chunk(picks, v_dim)
    for start in range(0, n, step):
        g = grad_out[start : start + step].to(acc)
        idx = indices[start : start + step]
        w = weights[start : start + step].to(acc)
        rows = values[idx].to(acc)
        grad_weights[start : start + step] = torch.bmm(rows, g.unsqueeze(-1)).squeeze(-1)
        contrib = (w.unsqueeze(-1) * g.unsqueeze(1)).reshape(-1, v_dim)
        grad_values.index_add_(0, idx.reshape(-1), contrib)
    return grad_values.to(values.dtype), grad_weights.to(weights.dtype)
