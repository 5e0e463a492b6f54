"""Fused value updates: the memory values' optimizer step runs inside the bag's backward.

`fuse_value_updates(model, "rowwise_adagrad" | "adam", lr)` gives each value table a
`FusedTable` and installs it as the table owner's `bag_impl`. Its bag's backward returns the
weight gradient only: the value gradient is never materialised. The table's rows touched
by the step's tokens are updated in place, in the kernel that aggregates their gradients
(`memcompile::fused_row_update`), with the optimizer state kept here (float32).

Semantics:
- One step per backward pass. Every reader of a table (several layers sharing one pool)
  buffers its (indices, weights, output gradient) — activation-sized — and one update with
  the summed gradient runs when the backward pass ends (an autograd final callback). With a
  single reader per step the update runs in that reader's backward, in the kernel that also
  computes the weight gradient. Values are therefore never stale inside a step.
- Gradient accumulation: `accumulation_steps=k` buffers k backward passes and steps once on
  their summed gradient, as a dense optimizer would after k micro-batches (scale the loss
  as usual). `step_with=optimizer` refuses (MemcompileError) an update that comes before that
  optimizer has stepped since the previous update: undeclared accumulation.
- Clipping: `torch.nn.utils.clip_grad_norm_` cannot see a gradient that never exists, and
  values have `.grad is None`. `max_grad_norm` clips each table by its own gradient norm
  (`clip_grad_norm_`'s formula, max_norm / (norm + 1e-6) capped at 1); `last_grad_norm`.
- Column shards (the colwise plan): after `apply_plan`, each rank's FusedTable holds its
  columns and the plan's shard group (every rank of it sees every pick). Row-wise Adagrad
  (and clipping) all-reduce the per-row squared gradient norms, (rows,) float32 in a fixed
  layout, once per step.
- Learning-rate schedules: `lr_lambda(k)` scales the lr of update k (0-based), as
  `torch.optim.lr_scheduler.LambdaLR` stepped after each `optimizer.step()` scales the
  user's optimizer: give both the same function. Weight decay decays with the scheduled lr.
- Not with `retain_graph` double backward through one step (values change in place), nor
  inside torch.compile graphs (the update is Python-side: the lookup graph-breaks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .distributed import _replicated_bag
from .errors import MemcompileError, is_integer
from .fused_table import FusedTable, StepCounter, ValueOptimizer
from .memory_layer import value_owners
from .sharded_bag import ShardedBag

log = logging.getLogger(__name__)

_FORMAT = "memcompile.fused_value_updates"


class FusedValueUpdates:
    """What `fuse_value_updates` returns: the tables and their owners, state, `remove()`."""

    def __init__(self, owners: list[nn.Module], tables: list[FusedTable]) -> None:
        self.owners, self.tables = owners, tables

    @property
    def step(self) -> int:
        return self.tables[0].step

    @property
    def lr(self) -> float:
        """The learning rate of the next update (after `lr_lambda`)."""
        return self.tables[0].lr

    def step_with(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an update before `optimizer` has stepped since the previous one."""
        counter = StepCounter(optimizer)
        for table in self.tables:
            table.step_counter, table._counter_mark = counter, None

    def state_dict(self) -> dict:
        return {"format": _FORMAT, "version": 1,
                "tables": [t.state_dict() for t in self.tables]}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if (
            not isinstance(state, dict)
            or state.get("format") != _FORMAT
            or not isinstance(state.get("tables"), (list, tuple))
            or len(state["tables"]) != len(self.tables)
        ):
            raise MemcompileError(
                f"not the state of fused value updates of {len(self.tables)} table(s)"
            )
        for table, saved in zip(self.tables, state["tables"]):
            table.check_state_dict(saved)  # every table before any loads
        for table, saved in zip(self.tables, state["tables"]):
            table.load_state_dict(saved)

    def remove(self) -> None:
        """Back to ordinary autograd: the tables get `.grad` again; the state is dropped."""
        for owner, table in zip(self.owners, self.tables):
            if owner.__dict__.get("bag_impl") is table:
                del owner.bag_impl
            sharded = owner.__dict__.get("bag_impl")
            if isinstance(sharded, ShardedBag) and sharded.fused is table:
                sharded.fused = None
            if table.step_counter is not None:
                table.step_counter.hook.remove()


def fused_value_ids(model: nn.Module) -> set[int]:
    """ids of the value tables of `model` whose updates are fused (param_groups skips them)."""
    fused = set()
    for owner in value_owners(model):
        bag_impl = owner.__dict__.get("bag_impl")
        if isinstance(bag_impl, FusedTable) or getattr(bag_impl, "fused", None) is not None:
            fused.add(id(owner.values))
    return fused


def _fusable_shards(owner: nn.Module) -> bool:
    """A colwise table laid out by apply_plan: every rank of its group sees every pick, so
    each steps its columns (row-wise Adagrad all-reduces per-row sums over the group).
    apply_plan's other layouts are refused."""
    bag_impl = owner.bag_impl
    if bag_impl is _replicated_bag:
        raise MemcompileError(
            f"fused value updates do not take a replicated table ({type(owner).__name__} "
            "under a 'replicate' plan): plan it colwise (strategy={name: 'colwise'}) or "
            "leave it to the optimizer"
        )
    if not isinstance(bag_impl, ShardedBag):  # (a fused one is refused before this)
        return False
    spec = bag_impl.spec
    world = dist.get_world_size() if dist.is_initialized() else 1
    if spec.strategy == "colwise" and spec.size != world:
        raise MemcompileError(
            f"fused value updates take tables split colwise over all ranks; {spec.table} is "
            f"colwise over {spec.size} of {world} ranks, in {world // spec.size} replicas that "
            "would each step on their own tokens: plan it colwise over the whole mesh, or "
            "leave it to the optimizer"
        )
    if spec.strategy != "colwise":
        raise MemcompileError(
            f"fused value updates take tables that are whole or split colwise over all "
            f"ranks; {spec.table} is {spec.strategy} over {spec.size} of {world} ranks: plan "
            "it colwise (strategy={name: 'colwise'}) or leave it to the optimizer"
        )
    return True


def fuse_value_updates(
    model: nn.Module,
    optimizer: str,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    accumulation_steps: int = 1,
    stochastic_rounding: bool = False,
    initial_accumulator_value: float = 0.0,
    process_group: dist.ProcessGroup | None = None,
    seed: int = 0,
    step_with: torch.optim.Optimizer | None = None,
    lr_lambda: Callable[[int], float] | None = None,
) -> FusedValueUpdates:
    """Update every value table of `model` inside the backward pass (module docstring).

    `optimizer`: "rowwise_adagrad" (one float32 state per row, starting at
    `initial_accumulator_value`) or "adam" (lazy: per-element moments of the touched
    rows). Train the other parameters with your optimizer over
    `memcompile.param_groups(model, ...)`, which leaves fused tables out. Checkpoint
    `handle.state_dict()` beside the model's; `handle.remove()` undoes the fusion.
    `lr_lambda`: a schedule, update k uses `lr * lr_lambda(k)` (the function you give
    `LambdaLR` for the other parameters).
    """
    if step_with is not None and not isinstance(step_with, torch.optim.Optimizer):
        raise MemcompileError(
            f"step_with takes the torch.optim.Optimizer of the other parameters, got "
            f"{type(step_with).__name__}"
        )
    if not is_integer(seed) or not 0 <= seed < 2**62:
        raise MemcompileError(f"seed must be an int in [0, 2**62), got {seed!r}")
    if lr_lambda is not None and not callable(lr_lambda):
        raise MemcompileError(
            f"lr_lambda takes a function of the update count, as LambdaLR does, got "
            f"{type(lr_lambda).__name__}"
        )
    betas = tuple(betas) if isinstance(betas, (tuple, list)) else (betas,)
    rule = ValueOptimizer(optimizer, lr, betas, eps, weight_decay, max_grad_norm,
                          accumulation_steps, stochastic_rounding,
                          initial_accumulator_value)  # fmt: skip
    owners = value_owners(model)
    if not owners:
        raise MemcompileError("the model has no memory value tables to fuse updates into")
    fused = fused_value_ids(model)
    for owner in owners:
        if id(owner.values) in fused:
            raise MemcompileError(
                f"the updates of the value table of {type(owner).__name__} are fused already: "
                "call remove() on the handle fuse_value_updates returned first"
            )
        if owner.bag_impl is not None and not _fusable_shards(owner):
            raise MemcompileError(
                f"the value table of {type(owner).__name__} already has a bag_impl "
                f"({type(owner.bag_impl).__name__}) that fused updates cannot take"
            )
    tables = []
    for i, owner in enumerate(owners):  # every table built (and checked) before any is set
        sharded = isinstance(owner.bag_impl, ShardedBag)  # a colwise table of apply_plan
        # A shard: the rank's columns (same storage), stepped with its shard group.
        values = owner.values.to_local().detach() if sharded else owner.values
        group = owner.bag_impl.spec.group if sharded else process_group
        tables.append(
            FusedTable(values, rule, process_group=group, seed=seed + i, lr_lambda=lr_lambda)
        )
    for owner, table in zip(owners, tables):
        if isinstance(owner.bag_impl, ShardedBag):
            owner.bag_impl.fused = table
        else:
            owner.bag_impl = table
    handle = FusedValueUpdates(owners, tables)
    if step_with is not None:
        handle.step_with(step_with)
    log.info("fused %s updates for %d value table(s), lr %g", optimizer, len(tables), lr)
    return handle
