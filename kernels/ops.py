"""`memcompile::pk_topk` and `memcompile::bag` as torch.library custom ops,
`memcompile::silu_gate`, the Memory+ gating of the bag, `memcompile::pk_lookup`, all three in
one op for inference, and `memcompile::linears`, a memory layer's projections at inference.

Each op has a fake kernel (shapes only, for torch.compile and torch.export) and a
plain-PyTorch default kernel (`reference.py`). pk_topk, bag and silu_gate have a registered
autograd formula whose backward is itself a custom op, so a faster backend replaces forward
and backward by registering kernels for the six ops. pk_lookup has none: it is the
no-gradient path, where a backend may fuse the softmax and skip intermediates.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["pk_topk", "bag", "silu_gate", "pk_lookup", "linears"]


@torch.library.custom_op("memcompile::pk_topk", mutates_args=())
def pk_topk(q: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-knn product keys. q: (N, H, k_dim), keys: (H, 2, n_keys, k_dim/2).

    Returns (scores, indices), each (N, H, knn); scores are float32 (float64 for float64
    inputs) sorted descending; indices are int64 rows i*n_keys + j of the value table.
    """
    return reference.pk_topk(q, keys, knn)


@pk_topk.register_fake
def _pk_topk_fake(q, keys, knn):
    torch._check(q.dim() == 3, lambda: f"pk_topk: q must be (N, heads, k_dim), got {q.shape}")
    torch._check(keys.dim() == 4, lambda: "pk_topk: keys must be (heads, 2, n_keys, k_dim/2)")
    shape = (q.shape[0], q.shape[1], knn)
    scores = q.new_empty(shape, dtype=reference.accumulation_dtype(q.dtype))
    return scores, q.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("memcompile::pk_topk_backward", mutates_args=())
def pk_topk_backward(
    grad_scores: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.pk_topk_backward(grad_scores, q, keys, indices)


@pk_topk_backward.register_fake
def _pk_topk_backward_fake(grad_scores, q, keys, indices):
    # The kernels return contiguous gradients whatever the strides of q and keys.
    return q.new_empty(q.shape), keys.new_empty(keys.shape)


def _pk_topk_setup_context(ctx, inputs, output):
    q, keys, _ = inputs
    _, indices = output
    ctx.save_for_backward(q, keys, indices)


def _pk_topk_grad(ctx, grad_scores, _grad_indices):
    q, keys, indices = ctx.saved_tensors
    grad_q, grad_keys = pk_topk_backward(grad_scores.contiguous(), q, keys, indices)
    return grad_q, grad_keys, None


pk_topk.register_autograd(_pk_topk_grad, setup_context=_pk_topk_setup_context)


@torch.library.custom_op("memcompile::bag", mutates_args=())
def bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted bag: y[n] = sum_b weights[n, b] * values[indices[n, b]].

    values: (rows, v_dim) of any float dtype; indices (int64) and weights: (N, B).
    Accumulates in float32 (float64 for float64 tables); returns (N, v_dim) in values.dtype.
    """
    return reference.bag(values, indices, weights)


@bag.register_fake
def _bag_fake(values, indices, weights):
    torch._check(values.dim() == 2, lambda: "bag: values must be (rows, v_dim)")
    torch._check(indices.dim() == 2, lambda: "bag: indices must be (N, picks)")
    torch._check(indices.shape == weights.shape, lambda: "bag: indices and weights differ")
    return values.new_empty(indices.shape[0], values.shape[1])


@torch.library.custom_op("memcompile::bag_backward", mutates_args=())
def bag_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.bag_backward(grad_out, values, indices, weights)


@bag_backward.register_fake
def _bag_backward_fake(grad_out, values, indices, weights):
    # The kernels return contiguous gradients whatever the strides of values and weights.
    return values.new_empty(values.shape), weights.new_empty(weights.shape)


@torch.library.custom_op("memcompile::bag_backward_rows", mutates_args=())
def bag_backward_rows(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`bag_backward` with the value gradient of `rows` only (int64, sorted, distinct, every
    picked row among them): ((len(rows), v_dim) in that order, the weights' gradient)."""
    return reference.bag_backward_rows(grad_out, values, indices, weights, rows)


@bag_backward_rows.register_fake
def _bag_backward_rows_fake(grad_out, values, indices, weights, rows):
    return values.new_empty(rows.shape[0], values.shape[1]), weights.new_empty(weights.shape)


def _bag_setup_context(ctx, inputs, output):
    values, indices, weights = inputs
    ctx.save_for_backward(values, indices, weights)


def _bag_grad(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    grad_values, grad_weights = bag_backward(grad_out.contiguous(), values, indices, weights)
    return grad_values, None, grad_weights


bag.register_autograd(_bag_grad, setup_context=_bag_setup_context)


@torch.library.custom_op("memcompile::silu_gate", mutates_args=())
def silu_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * silu(gate) in gate's dtype: a Memory+ layer's gating of its bag, with gradients.
    One op (a backend fuses the product and its backward, and autograd keeps x and gate,
    not silu(gate)); x and gate have the same shape. Returns a contiguous tensor."""
    return reference.silu_gate(x, gate)


@silu_gate.register_fake
def _silu_gate_fake(x, gate):
    torch._check(x.shape == gate.shape, lambda: f"silu_gate: {x.shape} and {gate.shape} differ")
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("memcompile::silu_gate_backward", mutates_args=())
def silu_gate_backward(
    grad: torch.Tensor, x: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.silu_gate_backward(grad, x, gate)


@silu_gate_backward.register_fake
def _silu_gate_backward_fake(grad, x, gate):
    contiguous = torch.contiguous_format
    return torch.empty_like(x, memory_format=contiguous), torch.empty_like(
        gate, memory_format=contiguous
    )


def _silu_gate_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_gate_grad(ctx, grad):
    x, gate = ctx.saved_tensors
    return silu_gate_backward(grad.contiguous(), x, gate)


silu_gate.register_autograd(_silu_gate_grad, setup_context=_silu_gate_setup_context)


@torch.library.custom_op("memcompile::pk_lookup", mutates_args=())
def pk_lookup(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    knn: int,
    swilu: torch.Tensor | None = None,
) -> torch.Tensor:
    """The lookup of a memory layer without gradients: pk_topk, softmax over each head's
    knn scores, bag of all heads' picks. Returns (N, v_dim) in values.dtype, on q's device.
    With `swilu` (N, v_dim), the Memory+ gating's pre-activation, returns the bag times
    silu(swilu), in swilu's dtype (a backend multiplies before it rounds the bag).

    values may be pinned host memory while q and keys are on a GPU: the CUDA kernel then
    reads only the picked rows across the host link."""
    return reference.pk_lookup(q, keys, values, knn, swilu)


@pk_lookup.register_fake
def _pk_lookup_fake(q, keys, values, knn, swilu=None):
    torch._check(q.dim() == 3, lambda: f"pk_lookup: q must be (N, heads, k_dim), got {q.shape}")
    torch._check(values.dim() == 2, lambda: "pk_lookup: values must be (rows, v_dim)")
    shape = (q.shape[0], values.shape[1])
    if swilu is None:
        return q.new_empty(shape, dtype=values.dtype)
    torch._check(swilu.shape == shape, lambda: f"pk_lookup: swilu must be {shape}")
    return q.new_empty(shape, dtype=swilu.dtype)


@torch.library.custom_op("memcompile::linears", mutates_args=())
def linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """x (N, d_in) through several linear maps, [x @ w.T + b]: a memory layer's
    projections without gradients, which a backend may run in fewer launches (the query
    and gate projections read the same input)."""
    return reference.linears(x, weights, biases)


@linears.register_fake
def _linears_fake(x, weights, biases):
    torch._check(x.dim() == 2, lambda: f"linears: x must be (N, d_in), got {x.shape}")
    torch._check(len(weights) == len(biases), lambda: "linears: one bias (or None) a weight")
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]
