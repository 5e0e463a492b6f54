"""Fused row-wise optimizer steps for value tables: the update inside the bag's backward.

Three ops, each with a plain-PyTorch default kernel (this file: the CPU path and the
reference the Triton kernels are tested against) and a Triton kernel on CUDA
(`triton_update.py`, installed by `cuda.register_cuda_kernels`):

- `memcompile::bag_weight_grad(grad_out, values, indices)`: the bag's weight gradient
  alone, `grad_w[n, b] = values[indices[n, b]] . grad_out[n]`.
- `memcompile::row_grad_sq(values, indices, weights, grad_out)`: per table row, the squared
  norm of its aggregated gradient (0 for untouched rows); `(rows,)`, fixed layout, so it can
  be all-reduced over the column shards of a table.
- `memcompile::fused_row_update(values, state_a, state_b, indices, weights, grad_out, ...)`:
  aggregates each touched row's gradient (`sum_{(n,b): indices[n,b] = r} weights[n,b] *
  grad_out[n]`, never the dense value gradient) and applies the optimizer step to that row
  in place; optionally also returns the weight gradient, read from the rows before the step.

Optimizers (both with decoupled weight decay, touched rows only):
- "rowwise_adagrad": one state per row, `s += mean(g**2)` over the full row width,
  `w = w * (1 - lr*wd) - lr * g / (sqrt(s) + eps)`;
- "adam": per-element moments of the touched rows (lazy: other rows keep theirs), bias
  correction from the table's step count, the torch.optim.AdamW formula.
`scale` (a 1-element tensor) multiplies the gradient first (clipping); `row_sq`, when given,
replaces the locally computed squared row norms (the full rows' norms of a column shard).
The state is float32 (float64 for float64 tables); bf16 tables may round stochastically.
"""

from __future__ import annotations

import math

import torch

from .reference import accumulation_dtype

OPTIMIZERS = ("rowwise_adagrad", "adam")
# Elements of the (pairs, v_dim) gradient contributions materialised at once on the CPU.
_CHUNK_ELEMENTS = 1 << 22


def mix_seed(seed: int, step: int) -> int:
    """The random stream of one update (stochastic rounding): a function of seed and step."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**31 - 1)


def state_shapes(optimizer: str, shape: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (state_a, state_b): Adagrad's row sums and nothing, or Adam's two moments."""
    if optimizer == "rowwise_adagrad":
        return (shape[0],), (0,)
    if optimizer == "adam":
        return tuple(shape), tuple(shape)
    raise ValueError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")


# --- the plain-PyTorch kernels ----------------------------------------------------------


def weight_grad_reference(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    acc = accumulation_dtype(values.dtype)
    n, picks = indices.shape
    out = torch.empty(n, picks, dtype=acc, device=values.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, picks * values.shape[1]))
    for start in range(0, n, step):
        rows = values[indices[start : start + step]].to(acc)
        g = grad_out[start : start + step].to(acc).unsqueeze(-1)
        out[start : start + step] = torch.bmm(rows, g).squeeze(-1)
    return out


def _row_chunks(indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, acc):
    """Yields (rows, grads): distinct touched rows, ascending, and their aggregated gradients,
    in chunks of rows whose (pair, v_dim) contributions fit _CHUNK_ELEMENTS."""
    picks, v_dim = indices.shape[1], grad_out.shape[1]
    sorted_rows, order = torch.sort(indices.reshape(-1), stable=True)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    ends = counts.cumsum(0)
    flat_weights = weights.reshape(-1)
    budget = max(1, _CHUNK_ELEMENTS // max(1, v_dim))
    first = 0
    while first < rows.shape[0]:
        pair_start = int(ends[first - 1]) if first else 0
        stop = int(torch.searchsorted(ends, pair_start + budget, right=True))
        stop = max(stop, first + 1)
        pairs = order[pair_start : int(ends[stop - 1])]
        contrib = flat_weights[pairs].to(acc).unsqueeze(1) * grad_out[pairs // picks].to(acc)
        local = torch.repeat_interleave(
            torch.arange(stop - first, device=rows.device), counts[first:stop]
        )
        grads = torch.zeros(stop - first, v_dim, dtype=acc, device=grad_out.device)
        yield rows[first:stop], grads.index_add_(0, local, contrib)
        first = stop


def row_grad_sq_reference(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    acc = accumulation_dtype(values.dtype)
    out = torch.zeros(values.shape[0], dtype=acc, device=values.device)
    for rows, grads in _row_chunks(indices, weights, grad_out, acc):
        out[rows] = (grads * grads).sum(1)
    return out


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16, rounding up or down with probability given by the distance."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32,
                          device=x.device)  # fmt: skip
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def fused_row_update_reference(
    values, state_a, state_b, indices, weights, grad_out, row_sq, scale, optimizer, lr, eps,
    beta1, beta2, weight_decay, width, step, seed, stochastic_rounding, weight_grad,
):  # fmt: skip
    acc = accumulation_dtype(values.dtype)
    grad_w = weight_grad_reference(grad_out, values, indices) if weight_grad else None
    generator = None
    if stochastic_rounding and values.dtype == torch.bfloat16:
        generator = torch.Generator(device=values.device).manual_seed(seed)
    decay = 1.0 - lr * weight_decay
    gain = None if scale is None else scale.to(acc).reshape(())
    for rows, g in _row_chunks(indices, weights, grad_out, acc):
        if gain is not None:
            g = g * gain
        w = values[rows].to(acc)
        if optimizer == "rowwise_adagrad":
            if row_sq is None:
                sq = (g * g).sum(1)
            else:
                sq = row_sq[rows].to(acc) * (1.0 if gain is None else gain * gain)
            s = state_a[rows] + sq / width
            state_a[rows] = s
            w = w * decay - lr * g / (s.sqrt() + eps).unsqueeze(1)
        else:
            m = state_a[rows] * beta1 + (1 - beta1) * g
            v = state_b[rows] * beta2 + (1 - beta2) * g * g
            state_a[rows], state_b[rows] = m, v
            step_size = lr / (1 - beta1**step)
            w = w * decay - step_size * m / (v.sqrt() / math.sqrt(1 - beta2**step) + eps)
        values[rows] = (
            w.to(values.dtype) if generator is None else stochastic_round_bf16(w, generator)
        )
    return grad_w if grad_w is not None else values.new_empty(0, dtype=acc)


# --- the ops ----------------------------------------------------------------------------


@torch.library.custom_op("memcompile::bag_weight_grad", mutates_args=())
def bag_weight_grad(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """The weight gradient of `bag` alone: (N, picks), float32 (float64 for float64 tables)."""
    return weight_grad_reference(grad_out, values, indices)


@bag_weight_grad.register_fake
def _bag_weight_grad_fake(grad_out, values, indices):
    return values.new_empty(indices.shape, dtype=accumulation_dtype(values.dtype))


@torch.library.custom_op("memcompile::row_grad_sq", mutates_args=())
def row_grad_sq(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """Squared norm of each row's aggregated gradient, (rows,); 0 for untouched rows."""
    return row_grad_sq_reference(values, indices, weights, grad_out)


@row_grad_sq.register_fake
def _row_grad_sq_fake(values, indices, weights, grad_out):
    return values.new_empty(values.shape[0], dtype=accumulation_dtype(values.dtype))


@torch.library.custom_op(
    "memcompile::fused_row_update", mutates_args=("values", "state_a", "state_b")
)
def fused_row_update(
    values: torch.Tensor,
    state_a: torch.Tensor,
    state_b: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    row_sq: torch.Tensor | None,
    scale: torch.Tensor | None,
    optimizer: str,
    lr: float,
    eps: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    width: int,
    step: int,
    seed: int,
    stochastic_rounding: bool,
    weight_grad: bool,
) -> torch.Tensor:
    """One optimizer step on the rows `indices` touch, in place (see the module docstring).

    Returns the weight gradient (N, picks) read before the step when `weight_grad`, else an
    empty tensor. `step` is the step number (1 for the first; Adam's bias correction),
    `width` the full row width (Adagrad's mean), `seed` the stochastic-rounding stream.
    """
    return fused_row_update_reference(
        values, state_a, state_b, indices, weights, grad_out, row_sq, scale, optimizer, lr,
        eps, beta1, beta2, weight_decay, width, step, seed, stochastic_rounding, weight_grad,
    )  # fmt: skip


@fused_row_update.register_fake
def _fused_row_update_fake(values, state_a, state_b, indices, *args):
    weight_grad = args[-1]
    shape = indices.shape if weight_grad else (0,)
    return values.new_empty(shape, dtype=accumulation_dtype(values.dtype))
