"""Row-sparse value gradients: `values.grad` as a sparse COO tensor of the rows a step
touched, as `nn.Embedding(sparse=True)` gives, for optimizers that take one
(`torch.optim.SparseAdam`, `Adagrad`, `SGD`).

`sparse_value_grads(model)` installs `SparseGradBag` as each value table owner's
`bag_impl`. Only the backward changes: the picked rows' gradients come from
`memcompile::bag_backward_rows` (on a GPU the row pass of the bag kernel, run over those
rows alone), never a (rows, v_dim) dense table. Without a gradient to record, and in exported
graphs, the layer takes its usual path. Finding the touched rows (`torch.unique`)
synchronises with the host once per lookup.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..kernels import ops
from .errors import MemcompileError
from .memory_layer import value_owners

log = logging.getLogger(__name__)


class _SparseBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights):
        ctx.save_for_backward(values, indices, weights)
        return ops.bag(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        rows = torch.unique(indices)  # sorted
        grad_rows, grad_weights = ops.bag_backward_rows(
            grad_out.contiguous(), values, indices, weights, rows
        )
        grad_values = torch.sparse_coo_tensor(
            rows.unsqueeze(0), grad_rows, values.shape, is_coalesced=True, check_invariants=False
        )
        return grad_values, None, grad_weights if ctx.needs_input_grad[2] else None


class SparseGradBag:
    """A table owner's `bag_impl` whose backward gives the values a row-sparse gradient."""

    gradients_only = True  # MemoryLayer looks up as usual where no gradient is recorded

    def __call__(self, values, indices, weights) -> torch.Tensor:
        return _SparseBag.apply(values, indices, weights)


class SparseValueGrads:
    """What `sparse_value_grads` returns: the table owners, and `remove()` to go back."""

    def __init__(self, owners: list[nn.Module], bag: SparseGradBag) -> None:
        self.owners, self.bag = owners, bag

    def remove(self) -> None:
        """Back to dense value gradients."""
        for owner in self.owners:
            if owner.__dict__.get("bag_impl") is self.bag:
                del owner.bag_impl


def sparse_value_grads(model: nn.Module) -> SparseValueGrads:
    """From the next backward on, each value table of `model` gets a row-sparse gradient
    (a sparse COO `values.grad` holding the touched rows), for an optimizer that takes one:
    `torch.optim.SparseAdam(memcompile.memory_values(model))`, say, beside a dense optimizer
    for the other parameters. Returns a handle; `handle.remove()` goes back to dense."""
    owners = value_owners(model)
    if not owners:
        raise MemcompileError("the model has no memory value tables to give sparse gradients")
    for owner in owners:
        if owner.bag_impl is not None and not isinstance(owner.bag_impl, SparseGradBag):
            raise MemcompileError(
                f"the value table of {type(owner).__name__} has fused updates or a plan's "
                "layout (a bag_impl): row-sparse gradients take a plain table"
            )
    bag = SparseGradBag()  # a table sparse already (a copy of a model, say) is taken over
    for owner in owners:
        owner.bag_impl = bag
    log.info("row-sparse gradients for %d value table(s)", len(owners))
    return SparseValueGrads(owners, bag)
