"""`memcompile.plan`: the partitioned execution plan of a transformed model."""

from __future__ import annotations

from torch import nn

from .passes.partition import PartitionConfig, plan_model
from .runtime import BandwidthModel, MemcompileError, Mesh, Plan, parse_bytes


def plan(
    model: nn.Module,
    gpus_per_node: int,
    nodes: int = 1,
    *,
    mode: str = "train",
    gpu_memory: int | str = "80GB",
    tokens_per_step: int = 16384,
    bandwidth: BandwidthModel | None = None,
    strategy: str | dict[str, str] | None = None,
    optimizer_bytes_per_param: int = 8,
) -> Plan:
    """Place the memory tables and the dense rest of `model` on `nodes` x `gpus_per_node` GPUs.

    `mode` is "train" (dense part under FSDP2, gradients and AdamW state counted) or "infer"
    (dense part replicated; tables may stay in host memory). `tokens_per_step` counts all
    ranks together. `strategy` forces one of replicate / colwise / rowwise / host for every
    table instead of the cheapest that fits, or, as {table name: strategy}, for some tables
    (names as in `model.named_parameters()`, e.g. "memcompile_pool.values"). Save the plan with
    `memcompile.runtime.save_plan` and run it with `memcompile.runtime.apply_plan`.
    """
    if not isinstance(model, nn.Module):
        raise MemcompileError(
            f"plan takes the converted model (an nn.Module), got {type(model).__name__}: for a "
            "checkpoint, pass memcompile.load(path, materialize=False)"
        )
    config = PartitionConfig(
        mesh=Mesh(gpus_per_node, nodes),
        mode=mode,
        gpu_memory=parse_bytes(gpu_memory),
        tokens_per_step=tokens_per_step,
        bandwidth=bandwidth or BandwidthModel(),
        optimizer_bytes_per_param=optimizer_bytes_per_param,
        strategy=strategy,
    )
    return plan_model(model, config)
