"""Execute a partitioned plan with torch.distributed: `init_distributed` and `apply_plan`.

`apply_plan` checks the plan against the running world and the model before any collective,
then replaces each value table by its shard, a DTensor parameter on a DeviceMesh (Shard(1)
colwise, Shard(0) rowwise, Replicate() replicate; torch.chunk ranges, the layout DCP
reshards on load), installs the `bag_impl` that looks rows up across the shard group
(`sharded_bag.py`), and wraps the dense rest with FSDP2 `fully_shard` (training) with the
value tables left out. Gradients of tables that several groups hold (replicate, or shard
groups smaller than the world) are summed over those groups by a post-accumulate hook, so
an optimizer step sees the gradient of the mean loss over every rank's tokens.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..kernels import ops
from .errors import MemcompileError
from .init import normal_rows_
from .memory_layer import MemoryLayer, MemoryPool
from .plan import Plan, TablePlan, chunk_ranges, model_fingerprint
from .sharded_bag import ShardedBag, ShardSpec, run_collective

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
PLAN_ATTRIBUTE = "memcompile_plan"


class PlanMismatchError(MemcompileError):
    """The plan was made for another world size or model, or its shards are not the layout
    apply_plan builds."""


def init_distributed(
    backend: str | None = None, timeout: float | timedelta = DEFAULT_TIMEOUT_S
) -> tuple[int, int]:
    """`init_process_group` from the torchrun environment, with a finite `timeout`.

    Backend: NCCL when CUDA is there, else gloo. A collective that waits longer than
    `timeout` seconds for a peer (a rank that raised, exited or hangs) fails instead of
    hanging. Under NCCL each process takes the GPU `LOCAL_RANK`. Returns (rank, world size);
    a second call returns those of the running group.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise MemcompileError(
            f"torch.distributed environment not set ({', '.join(missing)} missing): start the "
            "script with torchrun, e.g. `torchrun --nproc-per-node 2 script.py`"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    options = {}
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        options["device_id"] = device
    dist.init_process_group(backend, timeout=timeout, **options)
    log.info(
        "torch.distributed: rank %d of %d, %s, timeout %s",
        dist.get_rank(),
        dist.get_world_size(),
        backend,
        timeout,
    )
    return dist.get_rank(), dist.get_world_size()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def value_tables(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """Every value table parameter of `model` by name, with the module that owns it."""
    tables = {}
    for path, module in model.named_modules():
        if isinstance(module, (MemoryPool, MemoryLayer)) and "values" in module._parameters:
            name = f"{path}.values" if path else "values"
            tables[name] = (module, module._parameters["values"])
    return tables


def _expected_span(table: TablePlan, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    rows, cols = (0, table.rows), (0, table.v_dim)
    index = rank % table.group_size
    if table.strategy == "colwise":
        cols = chunk_ranges(table.v_dim, table.group_size)[index]
    elif table.strategy == "rowwise":
        rows = chunk_ranges(table.rows, table.group_size)[index]
    return rows, cols


def check_plan(model: nn.Module, plan: Plan, world_size: int) -> None:
    """Raise PlanMismatchError unless `plan` fits this world and this model. No collective."""
    if plan.mesh.world_size != world_size:
        raise PlanMismatchError(
            f"the plan is for {plan.mesh.world_size} ranks ({plan.mesh.nodes} node(s) x "
            f"{plan.mesh.gpus_per_node}) but this job runs {world_size}: make a plan for "
            f"{world_size} with `memcompile plan`, or launch {plan.mesh.world_size} processes"
        )
    fingerprint = model_fingerprint(model)
    if plan.model_fingerprint != fingerprint:
        raise PlanMismatchError(
            f"the plan was made for another model (fingerprint {plan.model_fingerprint[:12]}, "
            f"this model {fingerprint[:12]}): make the plan from this converted model"
        )
    tables = value_tables(model)
    missing = sorted(set(tables) - {t.name for t in plan.tables})
    if missing:
        raise PlanMismatchError(f"the plan places no value table {missing[0]}: plan this model")
    for table in plan.tables:
        if table.name not in tables:
            raise PlanMismatchError(f"the plan's table {table.name} is not a value table here")
        installed = tables[table.name][0].__dict__.get("bag_impl")
        if installed is not None:
            raise MemcompileError(
                f"table {table.name} already has a bag_impl ({type(installed).__name__}): "
                "apply_plan installs its own; apply a plan once, before fused value updates, "
                "and without row-sparse gradients (handle.remove() first)"
            )
        shape = tuple(tables[table.name][1].shape)
        if shape != (table.rows, table.v_dim):
            raise PlanMismatchError(
                f"table {table.name} is {shape} here, {(table.rows, table.v_dim)} in the plan"
            )
        if table.strategy == "host" and plan.mode == "train":
            raise PlanMismatchError(f"table {table.name}: 'host' tables serve inference only")
        if table.group_size * table.replicas != world_size or world_size % table.group_size:
            raise PlanMismatchError(
                f"table {table.name}: {table.group_size} ranks x {table.replicas} replicas is "
                f"not the world of {world_size}"
            )
        if table.group_size > 1 and table.strategy not in ("colwise", "rowwise"):
            raise PlanMismatchError(
                f"table {table.name}: strategy {table.strategy} cannot span {table.group_size}"
            )
        for shard in sorted(table.shards, key=lambda s: s.rank):
            rows, cols = _expected_span(table, shard.rank)
            if (tuple(shard.rows), tuple(shard.cols)) != (rows, cols):
                raise PlanMismatchError(
                    f"table {table.name}: rank {shard.rank} is given rows {tuple(shard.rows)} "
                    f"cols {tuple(shard.cols)}, but {table.strategy} over {table.group_size} "
                    f"ranks holds rows {rows} cols {cols} (torch.chunk ranges)"
                )
    if plan.dense.strategy == "fully_shard" and plan.mode != "train":
        raise PlanMismatchError("dense strategy fully_shard is for mode 'train'")
    for unit in plan.dense.units:
        try:
            model.get_submodule(unit)
        except AttributeError:
            raise PlanMismatchError(f"the plan's dense unit {unit!r} is not in the model") from None


def _local_table(owner: nn.Module, param: torch.Tensor, rows, cols, device) -> torch.Tensor:
    """The shard rows x cols of a table on `device`; a lazy (meta) table builds only its
    own rows from the init recipe, a block at a time."""
    (r0, r1), (c0, c1) = rows, cols
    if not param.is_meta:
        return param.detach()[r0:r1, c0:c1].to(device, copy=True).contiguous()
    recipe = getattr(owner, "values_init", None)
    if recipe is None:
        raise MemcompileError("a value table is on the meta device without its init recipe")
    local = torch.empty(r1 - r0, c1 - c0, dtype=param.dtype, device=device)
    block = 16 * 4096
    for start in range(r0, r1, block):
        stop = min(r1, start + block)
        rows_full = torch.empty(stop - start, param.shape[1], dtype=param.dtype)
        normal_rows_(rows_full, recipe.std, recipe.seed, row_offset=start)
        local[start - r0 : stop - r0].copy_(rows_full[:, c0:c1])
    return local


def _replicated_bag(values, indices, weights):
    local = values.to_local() if hasattr(values, "to_local") else values
    return ops.bag(local, indices, weights)


def _sum_grads_hook(what: str, group, divide: int):
    """Post-accumulate hook: all_reduce the gradient over `group`, then divide by its size.

    The hook sees the accumulated `.grad`: what earlier backward passes left there is
    already equal on every rank, so the reduction multiplies it by `divide` and the division
    gives it back unchanged. Only an average stays right under gradient accumulation."""

    def hook(param: torch.Tensor) -> None:
        if param.grad is None:
            return
        with torch.no_grad():
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            run_collective(what, "all_reduce", "gradients", grad, group=group)
            if divide != 1:
                grad.div_(divide)

    return hook


def _refuse_training(param: torch.Tensor) -> None:
    raise MemcompileError(
        "this model runs an inference plan: its ranks reduce no gradients and would train "
        "apart; make a training plan (memcompile.plan(..., mode='train'), or memcompile plan "
        "without --mode infer)"
    )


class _Meshes:
    """DeviceMeshes by shard-group size: 1-D over the world, or (replicas, group)."""

    def __init__(self, device_type: str, world: int, mesh=None) -> None:
        self.device_type, self.world = device_type, world
        self._by_group = {world: mesh} if mesh is not None else {}

    def get(self, group_size: int):
        from torch.distributed.device_mesh import init_device_mesh

        if group_size not in self._by_group:
            if group_size == self.world:
                mesh = init_device_mesh(self.device_type, (self.world,), mesh_dim_names=("shard",))
            else:
                shape = (self.world // group_size, group_size)
                names = ("replica", "shard")
                mesh = init_device_mesh(self.device_type, shape, mesh_dim_names=names)
            self._by_group[group_size] = mesh
        return self._by_group[group_size]


def _place_table(model, table: TablePlan, owner, param, plan: Plan, meshes: _Meshes, device):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    rank, world = dist.get_rank(), dist.get_world_size()
    train = plan.mode == "train" and param.requires_grad
    rows, cols = _expected_span(table, rank)
    if table.strategy == "host":
        local = _local_table(owner, param, rows, cols, "cpu")
        if torch.cuda.is_available():
            local = local.pin_memory()
        owner.values = nn.Parameter(local, requires_grad=param.requires_grad)
        owner.bag_impl = None
        return
    if table.strategy == "replicate":
        mesh = meshes.get(world)
        local = _local_table(owner, param, rows, cols, device)
        dtensor = DTensor.from_local(local, mesh, [Replicate()], run_check=False)
        owner.values = nn.Parameter(dtensor, requires_grad=param.requires_grad)
        owner.bag_impl = _replicated_bag
        if train and world > 1:
            owner.values.register_post_accumulate_grad_hook(
                _sum_grads_hook(f"table {table.name}", mesh.get_group(), world)
            )
        return
    group_size, replicas = table.group_size, table.replicas
    mesh = meshes.get(group_size)
    local = _local_table(owner, param, rows, cols, device)
    shard = Shard(1 if table.strategy == "colwise" else 0)
    placements = [shard] if replicas == 1 else [Replicate(), shard]
    shape, stride = (table.rows, table.v_dim), (table.v_dim, 1)
    dtensor = DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )
    owner.values = nn.Parameter(dtensor, requires_grad=param.requires_grad)
    spec = ShardSpec(
        table=table.name,
        strategy=table.strategy,
        group=mesh.get_group(mesh.ndim - 1),
        size=group_size,
        index=rank % group_size,
        rows=table.rows,
        v_dim=table.v_dim,
        # The mean over the shard group's tokens; replicas average those means in the hook
        # below (a sum there would count a micro-batch accumulated before once per replica).
        grad_scale=1.0 / group_size if plan.mode == "train" else 1.0,
    )
    owner.bag_impl = ShardedBag(spec)
    if train and replicas > 1:
        owner.values.register_post_accumulate_grad_hook(
            _sum_grads_hook(f"table {table.name}", mesh.get_group(0), replicas)
        )


def _move_rest(model: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Move every parameter and buffer not in `skip` to `device`, keeping tied ones tied."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store, wrap in ((module._parameters, True), (module._buffers, False)):
            for key, tensor in list(store.items()):
                if tensor is None or id(tensor) in skip or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    data = tensor.detach().to(device)
                    moved[id(tensor)] = (
                        nn.Parameter(data, requires_grad=tensor.requires_grad) if wrap else data
                    )
                store[key] = moved[id(tensor)]


def apply_plan(model: nn.Module, plan: Plan, mesh: DeviceMesh | None = None) -> nn.Module:
    """Lay `model` out on the running process group as `plan` says; returns the model.

    Call it on every rank, after `init_distributed`, with the same model (same weights, e.g.
    built from the same seed or checkpoint) and plan. `mesh`: a 1-D DeviceMesh over the
    world to use for the dense part and world-wide tables (default: one is made). Raises
    PlanMismatchError, before any collective, for a plan of another world size or model.
    """
    if not dist.is_initialized():
        raise MemcompileError(
            "apply_plan needs a process group: call memcompile.runtime.init_distributed() "
            "first (under torchrun)"
        )
    world = dist.get_world_size()
    check_plan(model, plan, world)
    device = _device()
    tables = value_tables(model)
    _move_rest(model, device, {id(p) for _, p in tables.values()})
    meshes = _Meshes(device.type, world, mesh)
    for table in plan.tables:
        owner, param = tables[table.name]
        _place_table(model, table, owner, param, plan, meshes, device)
        log.info(
            "%s: %s over %d rank(s) x %d replica(s)",
            table.name,
            table.strategy,
            table.group_size,
            table.replicas,
        )
    ignored = {owner.values for owner, _ in tables.values()}
    dense_mesh = meshes.get(world)
    if plan.dense.strategy == "fully_shard" and world > 1:
        from torch.distributed.fsdp import fully_shard

        for unit in plan.dense.units:
            fully_shard(model.get_submodule(unit), mesh=dense_mesh, ignored_params=ignored)
        if "" not in plan.dense.units:
            fully_shard(model, mesh=dense_mesh, ignored_params=ignored)
    elif plan.mode == "train" and world > 1:
        # A replicated dense part trains like DDP: average every gradient over the world.
        for name, param in model.named_parameters():
            if param.requires_grad and param not in ignored:
                param.register_post_accumulate_grad_hook(
                    _sum_grads_hook(f"parameter {name}", dense_mesh.get_group(), world)
                )
    elif world > 1:  # inference: no gradient is reduced, so ranks would train apart
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(_refuse_training)
    setattr(model, PLAN_ATTRIBUTE, plan)
    return model
