"""The partition pass: where each memory table and the dense rest of a model live on a mesh.

For every value table it prices each placement (`plan_costs.option`: replicate, colwise or
rowwise over a node or over the whole mesh, host in inference), keeps the fastest that fits
in GPU memory next to the dense part (FSDP2 `fully_shard` in training, replicated in
inference) and the tables placed before it, and writes down why. A table that fits
nowhere is an error naming the number of GPUs it would need.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

from torch import nn

from ..runtime.errors import MemcompileError, is_integer
from ..runtime.memory_layer import MemoryLayer
from ..runtime.plan import (
    MODES,
    STRATEGIES,
    Alternative,
    BandwidthModel,
    Collective,
    DensePlan,
    Mesh,
    Plan,
    RankMemory,
    TablePlan,
    model_fingerprint,
)
from .plan_costs import Option, Table, option

log = logging.getLogger(__name__)

# Activations the dense part keeps per token and transformer block in training, in units
# of d_model elements (attention and FFN inputs, norms, softmax output; rough by design).
DENSE_ACTIVATIONS_PER_BLOCK = 16


@dataclass(frozen=True)
class PartitionConfig:
    """What to plan for. `tokens_per_step` counts all ranks together (spread evenly)."""

    mesh: Mesh
    mode: str = "train"
    gpu_memory: int = 80 * 10**9
    tokens_per_step: int = 16384
    bandwidth: BandwidthModel = field(default_factory=BandwidthModel)
    optimizer_bytes_per_param: int = 8  # AdamW: two fp32 moments
    headroom: float = 0.1  # of GPU memory, kept for workspace and fragmentation
    host_memory: int = 2 * 10**12  # per node, for the host strategy
    # Force a strategy: one for every table, or {table name: strategy} for some of them.
    strategy: str | dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MemcompileError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        forced = self.strategy.values() if isinstance(self.strategy, dict) else [self.strategy]
        for strategy in forced:
            if strategy is not None and strategy not in STRATEGIES:
                raise MemcompileError(
                    f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
                )
            if strategy == "host" and self.mode == "train":
                raise MemcompileError("strategy 'host' serves inference only: use --mode infer")
        minimum = {"gpu_memory": 1, "tokens_per_step": 1, "host_memory": 1,
                   "optimizer_bytes_per_param": 0}  # fmt: skip
        for name, low in minimum.items():
            value = getattr(self, name)
            if not is_integer(value) or value < low:
                raise MemcompileError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.bandwidth, BandwidthModel):
            raise MemcompileError(
                f"bandwidth takes a memcompile.runtime.BandwidthModel, got "
                f"{type(self.bandwidth).__name__}"
            )
        if not 0 <= self.headroom < 1:
            raise MemcompileError(f"headroom is a fraction in [0, 1), got {self.headroom!r}")

    def forced(self, table: str) -> str | None:
        if isinstance(self.strategy, dict):
            return self.strategy.get(table)
        return self.strategy

    @property
    def budget(self) -> int:
        return int(self.gpu_memory * (1 - self.headroom))

    @property
    def tokens_per_rank(self) -> int:
        return math.ceil(self.tokens_per_step / self.mesh.world_size)


def find_tables(model: nn.Module) -> list[Table]:
    """Every value table of `model` (a shared pool once), with the layers that read it."""
    names = {id(p): name for name, p in model.named_parameters()}
    readers: dict[int, list[tuple[str, MemoryLayer]]] = {}
    for path, module in model.named_modules():
        if isinstance(module, MemoryLayer):
            readers.setdefault(id(module.value_table), []).append((path, module))
    tables = []
    for key, layers in readers.items():
        if key not in names:
            raise MemcompileError(
                f"memory layer {layers[0][0]} reads a value table that is not a parameter of "
                "the model: plan the model that holds the shared pool"
            )
        first = layers[0][1]
        values = first.value_table
        tables.append(
            Table(
                name=names[key],
                rows=values.shape[0],
                v_dim=values.shape[1],
                dtype=values.dtype,
                readers=tuple(path for path, _ in layers),
                picks=max(layer.heads * layer.knn for _, layer in layers),
                query_width=first.heads * first.k_dim,
            )
        )
    return tables


def fsdp_units(model: nn.Module) -> tuple[str, ...]:
    """The blocks of the longest nn.ModuleList (the transformer stack), then the root."""
    stacks = [(len(m), path) for path, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        return ("",)
    length, path = max(stacks, key=lambda item: (item[0], -len(item[1])))
    return (*(f"{path}.{i}" if path else str(i) for i in range(length)), "")


def _dense(model: nn.Module, tables: list[Table], config: PartitionConfig):
    """The dense part's plan and its per-rank bytes (weights, grads, state, activations)."""
    table_names = {t.name for t in tables}
    dense = [(n, p) for n, p in model.named_parameters() if n not in table_names]
    count = sum(p.numel() for _, p in dense)
    nbytes = sum(p.numel() * p.element_size() for _, p in dense)
    world, mesh, train = config.mesh.world_size, config.mesh, config.mode == "train"
    readers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    d_model = readers[0].d_in
    element = max((p.element_size() for _, p in dense), default=4)
    units = fsdp_units(model)
    blocks = max(len(units) - 1, 1)
    t = config.tokens_per_rank
    link = "inter_node" if mesh.nodes > 1 else "intra_node"
    bw = config.bandwidth
    collectives: tuple[Collective, ...] = ()
    if train:
        shard = math.ceil(nbytes / world)
        sent = (world - 1) * shard
        if world > 1:
            collectives = (
                Collective("params_all_gather", "all_gather_into_tensor", "world", "forward",
                           1, (sent,) * world, link),
                Collective("params_all_gather_backward", "all_gather_into_tensor", "world",
                           "backward", 1, (sent,) * world, link),
                Collective("grads_reduce_scatter", "reduce_scatter_tensor", "world",
                           "backward", 1, (sent,) * world, link),
            )  # fmt: skip
        state = math.ceil(count / world) * config.optimizer_bytes_per_param
        activations = DENSE_ACTIVATIONS_PER_BLOCK * d_model * element * t * blocks
        memory = (shard, shard, state, activations)
        plan = DensePlan("fully_shard", units, count, collectives)
        compute = 6 * count * t / (bw.flops * bw.mfu)
        optimizer = math.ceil(count / world) * (3 * element + 2 * config.optimizer_bytes_per_param)
        sent_per_step = sum(c.bytes_per_step(0) for c in collectives)
        times = {
            "dense_compute": compute,
            "dense_communication": sent_per_step / getattr(bw, link),
            "dense_optimizer": optimizer / bw.hbm,
        }
    else:
        memory = (nbytes, 0, 0, 4 * d_model * element * t)
        plan = DensePlan("replicate", ("",), count, ())
        times = {"dense_compute": 2 * count * t / (bw.flops * bw.mfu)}
    return plan, memory, times


def _candidates(table: Table, config: PartitionConfig) -> list[Option]:
    mesh = config.mesh
    world = mesh.world_size
    shapes = [("replicate", 1)]
    for group in sorted({mesh.gpus_per_node, world}):
        if group > 1:
            shapes += [("colwise", group), ("rowwise", group)]
    if config.mode == "infer":
        shapes.append(("host", 1))
    forced = config.forced(table.name)
    if forced is not None:
        shapes = [s for s in shapes if s[0] == forced] or [(forced, world)]
    return [
        option(table, mesh, strategy, group, config.mode, config.tokens_per_rank,
               config.bandwidth, config.optimizer_bytes_per_param)
        for strategy, group in shapes
    ]  # fmt: skip


def _fits(opt: Option, used: list[int], config: PartitionConfig) -> bool:
    if opt.host_bytes > config.host_memory:
        return False
    return all(used[r] + opt.rank_bytes(r) <= config.budget for r in range(len(used)))


def _gb(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _gpus_needed(model: nn.Module, table: Table, config: PartitionConfig) -> str:
    """The fewest GPUs (sharding `table` over all of them) on which it fits alone."""

    def fits(world: int) -> str | None:
        trial = replace(config, mesh=Mesh(world), strategy=None)
        _, dense, _ = _dense(model, [table], trial)
        for opt in _candidates(table, trial):
            if opt.strategy != "replicate" and _fits(opt, [sum(dense)] * world, trial):
                return opt.strategy
        return None

    low, high = config.mesh.world_size, max(2, 2 * config.mesh.world_size)
    while fits(high) is None:  # per-rank bytes fall as the mesh grows: search, then bisect
        if high >= 1 << 16:
            return "more than 65536 GPUs"
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return f"at least {high} GPUs of this size ({fits(high)})"


def _choose(model, tables, config, dense_bytes) -> list[tuple[Table, Option, list[Option]]]:
    used = [dense_bytes] * config.mesh.world_size
    chosen = []
    for table in sorted(tables, key=lambda t: -t.nbytes):
        options = sorted(_candidates(table, config), key=lambda o: o.step_time_s)
        fitting = [o for o in options if _fits(o, used, config)]
        if not fitting:
            mode_hint = "" if config.mode == "infer" else ", or plan --mode infer (host values)"
            raise MemcompileError(
                f"memory table {table.name} ({table.rows} x {table.v_dim} {_dtype(table)}, "
                f"{_gb(table.nbytes)}) fits on no strategy of a {config.mesh.world_size}-GPU "
                f"mesh with {_gb(config.gpu_memory)} per GPU: it needs "
                f"{_gpus_needed(model, table, config)}{mode_hint}"
            )
        best = fitting[0]
        used = [used[r] + best.rank_bytes(r) for r in range(len(used))]
        chosen.append((table, best, options))
    return chosen


def _dtype(table: Table) -> str:
    return str(table.dtype).removeprefix("torch.")


def _table_plan(table: Table, best: Option, options: list[Option], config) -> TablePlan:
    def describe(o: Option) -> str:
        over = f" over {o.group_size} ranks" if o.strategy in ("colwise", "rowwise") else ""
        return f"{o.strategy}{over}"

    alternatives = []
    for o in options:
        if o is best:
            continue
        fits = _fits(o, [0] * config.mesh.world_size, config)
        peak = max(o.rank_bytes(r) for r in range(config.mesh.world_size))
        note = f"{o.step_time_s * 1e3:.2f} ms/step" if fits else f"needs {_gb(peak)} per rank"
        alternatives.append(Alternative(o.strategy, o.group_size, fits, peak, o.step_time_s, note))
    peak = max(best.rank_bytes(r) for r in range(config.mesh.world_size))
    others = "; ".join(f"{describe(o)}: {a.note}" for o, a in zip(
        [o for o in options if o is not best], alternatives))  # fmt: skip
    reason = (
        f"{describe(best)}: fastest that fits, est. {best.step_time_s * 1e3:.2f} ms/step, "
        f"{_gb(peak)} per rank with its gradients, optimizer state and activations"
        + (f" (others: {others})" if others else "")
    )
    if config.forced(table.name) is not None:
        reason = f"{describe(best)}: forced by the caller"
    return TablePlan(
        name=table.name, rows=table.rows, v_dim=table.v_dim, dtype=_dtype(table),
        readers=table.readers, picks=table.picks, strategy=best.strategy,
        group_size=best.group_size, replicas=best.replicas, shards=best.shards,
        collectives=best.collectives, reason=reason, alternatives=tuple(alternatives),
    )  # fmt: skip


def plan_model(model: nn.Module, config: PartitionConfig) -> Plan:
    """Place every memory table of a transformed `model` and its dense rest on `config.mesh`."""
    tables = find_tables(model)
    if not tables:
        raise MemcompileError(
            "the model has no memory layers: convert it first (memcompile convert / transform)"
        )
    if isinstance(config.strategy, dict):
        unknown = sorted(set(config.strategy) - {t.name for t in tables})
        if unknown:
            raise MemcompileError(
                f"strategy names {unknown[0]!r}, not a value table of the model; tables: "
                f"{', '.join(t.name for t in tables)}"
            )
    dense_plan, dense_memory, times = _dense(model, tables, config)
    if sum(dense_memory) > config.budget:
        raise MemcompileError(
            f"the dense part alone does not fit: it needs {_gb(sum(dense_memory))} per rank "
            f"({dense_plan.strategy}), {_gb(config.budget)} of each GPU is usable: give more "
            "GPU memory (--gpu-mem), more GPUs or fewer tokens per step"
        )
    chosen = _choose(model, tables, config, sum(dense_memory))
    world = config.mesh.world_size
    ranks = tuple(
        RankMemory(
            r,
            dense_memory[0] + sum(o.weights[r] for _, o, _ in chosen),
            dense_memory[1] + sum(o.gradients[r] for _, o, _ in chosen),
            dense_memory[2] + sum(o.optimizer_state[r] for _, o, _ in chosen),
            dense_memory[3] + sum(o.activations[r] for _, o, _ in chosen),
        )
        for r in range(world)
    )
    times = {"memory_tables": sum(o.step_time_s for _, o, _ in chosen), **times}
    table_plans = tuple(_table_plan(t, o, opts, config) for t, o, opts in chosen)
    peak = max(ranks, key=lambda m: m.total)
    step = sum(times.values())
    mesh = config.mesh
    strategies = ", ".join(f"{t.name} {t.strategy}" for t in table_plans)
    summary = (
        f"{world} GPUs ({mesh.nodes} node(s) x {mesh.gpus_per_node}), {config.mode}, "
        f"{config.tokens_per_step} tokens/step: {strategies}; dense part {dense_plan.strategy}; "
        f"est. {step * 1e3:.2f} ms/step; peak {_gb(peak.total)} of {_gb(config.gpu_memory)} "
        f"on rank {peak.rank}"
    )
    log.info("plan: %s", summary)
    return Plan(
        mesh=mesh, mode=config.mode, tokens_per_step=config.tokens_per_step,
        gpu_memory_bytes=config.gpu_memory, bandwidth=config.bandwidth,
        model_fingerprint=model_fingerprint(model), tables=table_plans, dense=dense_plan,
        ranks=ranks, step_time_s=step, time_breakdown_s=times, summary=summary,
        settings={
            "tokens_per_rank": config.tokens_per_rank,
            "optimizer_bytes_per_param": config.optimizer_bytes_per_param,
            "headroom": config.headroom,
            "host_memory_bytes": config.host_memory,
            "dense_activations": f"{DENSE_ACTIVATIONS_PER_BLOCK} x d_model elements per "
            "token per block (training), 4 x d_model (inference)",
            "forced_strategy": config.strategy,
        },
    )  # fmt: skip
