"""The training recipe for converted models: memory values in their own optimizer group.

Memory Layers at Scale (Berges et al. 2024) trains the value tables with their own, higher,
fixed learning rate and no weight decay: each value row only gets a gradient from the few
tokens that pick it, so it needs bigger steps than the dense weights, and weight decay would
pull the rows that are rarely picked back to zero between their updates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from torch import nn

from .runtime import MemcompileError
from .runtime.errors import is_number
from .runtime.fused_values import fuse_value_updates, fused_value_ids
from .runtime.memory_layer import value_owners
from .runtime.sparse_grads import SparseGradBag, sparse_value_grads

__all__ = ["fuse_value_updates", "memory_values", "param_groups", "sparse_value_grads"]

log = logging.getLogger(__name__)

VALUES_GROUP = "memory_values"
DEFAULT_GROUP = "default"


def memory_values(model: nn.Module) -> Iterator[nn.Parameter]:
    """The value tables of every memory layer of `model`, each shared table once.

    That is the shared `MemoryPool.values` (`memcompile_pool.values` at the model root)
    and the own `values` of layers converted with `share_values=False`.
    """
    for owner in value_owners(model):
        yield owner.values


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    value_lr: float = 1e-3,
) -> list[dict]:
    """Optimizer parameter groups: memory values apart, with `value_lr` and no weight decay.

    Returns `[{"name": "default", "params": [...], "lr": lr, "weight_decay": weight_decay},
    {"name": "memory_values", "params": [...], "lr": value_lr, "weight_decay": 0.0}]`, ready
    for `torch.optim.AdamW(param_groups(model, 3e-4, 0.1))`. Every other trainable parameter
    (requires_grad) goes into the first group unchanged, each shared tensor once; frozen
    parameters are left out, and so is an empty group: a model without memory values gets
    the first group only, so the same code trains a dense baseline. Tables whose updates
    are fused (`fuse_value_updates`) are left out of both groups: their own backward updates
    them. A learning-rate scheduler scales every group; give it one schedule per group (e.g.
    `LambdaLR(opt, [schedule, lambda step: 1.0])`) to keep the value rate fixed.
    """
    for name, value in (("lr", lr), ("value_lr", value_lr)):
        if not is_number(value) or not value > 0:
            raise MemcompileError(f"{name} must be a positive number, got {value!r}")
    if not is_number(weight_decay) or not weight_decay >= 0:
        raise MemcompileError(f"weight_decay must be >= 0, got {weight_decay!r}")
    tables = list(memory_values(model))
    fused = fused_value_ids(model)
    values = [v for v in tables if v.requires_grad and id(v) not in fused]
    if any(v.is_meta for v in values):
        raise MemcompileError(
            "the model's value tables are still on the meta device (lazy init): call "
            "memcompile.runtime.materialize_values(model) before building the optimizer"
        )
    value_ids = {id(v) for v in tables}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
    if not rest and not values:
        fused_note = " besides its fused value tables" if fused else ""
        raise MemcompileError(f"the model has no trainable parameters (requires_grad){fused_note}")
    groups = [{"name": DEFAULT_GROUP, "params": rest, "lr": lr, "weight_decay": weight_decay}]
    if values:
        groups.append({"name": VALUES_GROUP, "params": values, "lr": value_lr, "weight_decay": 0.0})
    groups = [group for group in groups if group["params"]]
    if any(isinstance(o.bag_impl, SparseGradBag) for o in value_owners(model)) and values:
        log.warning(
            "the value tables have row-sparse gradients (sparse_value_grads): give the "
            "'memory_values' group to an optimizer that takes them (SparseAdam, Adagrad, "
            "SGD); Adam and AdamW refuse them at step()"
        )
    log.info(
        "param_groups: %d tensors at lr %g, %d value tables (%d rows) at lr %g, %d fused",
        len(rest),
        lr,
        len(values),
        sum(v.shape[0] for v in values),
        value_lr,
        len(fused),
    )
    return groups
