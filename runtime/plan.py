"""The partitioned execution plan: its objects, its JSON file, and how a model is recognised.

`passes/partition.py` makes a `Plan`; `runtime/distributed.py` executes one. On disk a plan
is versioned JSON validated against `plan_schema.json` (next to this file) on load. Bytes
are per rank; a collective's `bytes_by_rank[r]` is what rank r sends each time it is issued
(all_gather: (G-1) x its input; all_to_all: its input less the chunk it keeps; all_reduce:
2 (G-1)/G x the tensor, the ring algorithm), and it is issued `per_step` times a step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from .errors import MemcompileError, is_integer
from .outputs import atomic_file

PLAN_FORMAT = "memcompile.plan"
PLAN_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("plan_schema.json")
STRATEGIES = ("replicate", "colwise", "rowwise", "host")
MODES = ("train", "infer")

_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_bytes(text: str | int) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, 1024 -> 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _BYTES_RE.match(str(text))
    if match is None:
        raise MemcompileError(
            f"{text!r} is not a memory size: write e.g. '80GB' (10**9 bytes) or '80GiB' (2**30)"
        )
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** _POWERS[prefix.upper()])


MAX_WORLD_SIZE = 1 << 20  # ranks a plan may describe


@dataclass(frozen=True)
class Mesh:
    """`nodes` x `gpus_per_node` ranks; rank r sits on node r // gpus_per_node."""

    gpus_per_node: int
    nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise MemcompileError(f"mesh {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy and torch integers too
        if self.world_size > MAX_WORLD_SIZE:  # a plan lists per-rank shards and bytes
            raise MemcompileError(
                f"a mesh of {self.world_size:,} GPUs is more than a plan describes "
                f"(at most {MAX_WORLD_SIZE:,})"
            )

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class BandwidthModel:
    """What a step costs: bytes/s of each link and of HBM, and dense compute speed.

    Defaults are H100-class nodes: HBM3 copy ceiling, NVLink 4 per direction, one 400 Gb/s
    NIC per GPU between nodes, PCIe 5 x16 to the host, bf16 dense matmul peak.
    """

    hbm: float = 3.0e12
    intra_node: float = 450e9
    inter_node: float = 50e9
    host_link: float = 55e9
    host_memory: float = 100e9  # host DRAM bandwidth one GPU's share of the CPU gets
    flops: float = 700e12
    mfu: float = 0.4  # fraction of `flops` the dense part achieves

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 < value < math.inf:  # inf would write Infinity: not JSON
                raise MemcompileError(
                    f"bandwidth {f.name} must be a positive finite number, got {value!r}"
                )
        if self.mfu > 1:
            raise MemcompileError(f"bandwidth mfu is a fraction of peak (0, 1], got {self.mfu}")


@dataclass(frozen=True)
class Shard:
    rank: int
    rows: tuple[int, int]  # [start, stop) of the table's rows this rank holds
    cols: tuple[int, int]  # [start, stop) of v_dim
    bytes: int


@dataclass(frozen=True)
class Collective:
    name: str
    op: str  # all_gather_into_tensor | all_to_all_single | all_reduce | ...
    group: str  # "shard" (the table's group), "replica" (same shard across groups), "world"
    phase: str  # forward | backward | step
    per_step: int
    bytes_by_rank: tuple[int, ...]
    link: str  # intra_node | inter_node
    data_dependent: bool = False  # bytes are the expectation for uniformly spread indices

    def bytes_per_step(self, rank: int) -> int:
        return self.bytes_by_rank[rank] * self.per_step


@dataclass(frozen=True)
class Alternative:
    strategy: str
    group_size: int
    fits: bool
    bytes_per_rank: int
    step_time_s: float
    note: str


@dataclass(frozen=True)
class TablePlan:
    name: str  # the values parameter's name in the model, e.g. "memcompile_pool.values"
    rows: int
    v_dim: int
    dtype: str
    readers: tuple[str, ...]  # memory layers reading the table
    picks: int  # heads * knn rows per token per reader
    strategy: str
    group_size: int
    replicas: int
    shards: tuple[Shard, ...]
    collectives: tuple[Collective, ...]
    reason: str
    alternatives: tuple[Alternative, ...] = ()


@dataclass(frozen=True)
class DensePlan:
    strategy: str  # fully_shard | replicate
    units: tuple[str, ...]  # modules wrapped with fully_shard, innermost first; "" is the root
    parameters: int
    collectives: tuple[Collective, ...]


@dataclass(frozen=True)
class RankMemory:
    rank: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class Plan:
    mesh: Mesh
    mode: str
    tokens_per_step: int  # over all ranks, spread evenly
    gpu_memory_bytes: int
    bandwidth: BandwidthModel
    model_fingerprint: str
    tables: tuple[TablePlan, ...]
    dense: DensePlan
    ranks: tuple[RankMemory, ...]
    step_time_s: float
    time_breakdown_s: dict[str, float]
    summary: str
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> TablePlan:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for rank, memory in zip(body["ranks"], self.ranks):
            rank["total"] = memory.total
        body["mesh"]["world_size"] = self.mesh.world_size
        # Through JSON and back: lists, not tuples, exactly what a plan file holds.
        return json.loads(json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION, **body}))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        validate_plan_json(data)
        data = json.loads(json.dumps(data))  # a deep copy we may consume
        for rank in data["ranks"]:
            rank.pop("total")
        mesh = data["mesh"]
        mesh.pop("world_size")

        def collectives(items):
            return tuple(
                Collective(**{**c, "bytes_by_rank": tuple(c["bytes_by_rank"])}) for c in items
            )

        tables = tuple(
            TablePlan(
                **{
                    **t,
                    "readers": tuple(t["readers"]),
                    "shards": tuple(
                        Shard(s["rank"], tuple(s["rows"]), tuple(s["cols"]), s["bytes"])
                        for s in t["shards"]
                    ),
                    "collectives": collectives(t["collectives"]),
                    "alternatives": tuple(Alternative(**a) for a in t["alternatives"]),
                }
            )
            for t in data["tables"]
        )
        dense = data["dense"]
        return cls(
            mesh=Mesh(**mesh),
            mode=data["mode"],
            tokens_per_step=data["tokens_per_step"],
            gpu_memory_bytes=data["gpu_memory_bytes"],
            bandwidth=BandwidthModel(**data["bandwidth"]),
            model_fingerprint=data["model_fingerprint"],
            tables=tables,
            dense=replace(
                DensePlan(**{**dense, "collectives": ()}),
                units=tuple(dense["units"]),
                collectives=collectives(dense["collectives"]),
            ),
            ranks=tuple(RankMemory(**r) for r in data["ranks"]),
            step_time_s=data["step_time_s"],
            time_breakdown_s=data["time_breakdown_s"],
            summary=data["summary"],
            settings=data["settings"],
        )


def validate_plan_json(data: Any) -> None:
    """Check `data` against plan_schema.json; one line saying where it is wrong."""
    import jsonschema

    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise MemcompileError(f'not a memcompile plan (no "format": "{PLAN_FORMAT}")')
    if data.get("version") != PLAN_VERSION:
        raise MemcompileError(
            f"plan format version {data.get('version')!r} is not supported (this memcompile "
            f"reads version {PLAN_VERSION}): make the plan again with `memcompile plan`"
        )
    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise MemcompileError(f"invalid plan at {where}: {error.message}")
    mesh = data["mesh"]
    if not all(type(mesh[key]) is int for key in ("nodes", "gpus_per_node", "world_size")):
        raise MemcompileError("invalid plan: the mesh's sizes must be integers (no 2.0)")
    world = mesh["world_size"]
    if world != mesh["nodes"] * mesh["gpus_per_node"] or world > MAX_WORLD_SIZE:
        raise MemcompileError(
            f"invalid plan: mesh world_size is not nodes x gpus_per_node, or more than "
            f"{MAX_WORLD_SIZE:,}"
        )
    for table in data["tables"]:
        if len(table["shards"]) != world or sorted(
            s["rank"] for s in table["shards"]
        ) != list(range(world)):
            raise MemcompileError(f"invalid plan: table {table['name']} needs one shard per rank")
        for c in table["collectives"]:
            if len(c["bytes_by_rank"]) != world:
                raise MemcompileError(
                    f"invalid plan: collective {c['name']} of {table['name']} needs bytes for "
                    f"each of the {world} ranks"
                )


def save_plan(plan: Plan, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write `plan` as JSON, atomically (a failed write leaves no file); an existing file
    only with `force`."""
    path = Path(path)
    text = json.dumps(plan.to_json(), indent=2, allow_nan=False) + "\n"
    with atomic_file(path, force=force) as tmp:
        tmp.write_text(text)
    return path


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise MemcompileError(f"plan {str(path)!r} does not exist: make one with `memcompile plan`")
    try:
        data = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, NaN, Infinity, nesting
        raise MemcompileError(f"plan {str(path)!r} is not JSON ({e})") from None
    return Plan.from_json(data)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter's name, shape and dtype: a plan is made for one model."""
    items = sorted(
        (name, list(p.shape), str(p.dtype).removeprefix("torch."))
        for name, p in model.named_parameters()
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def chunk_ranges(size: int, parts: int) -> list[tuple[int, int]]:
    """The [start, stop) ranges of torch.chunk(size, parts) (DTensor's Shard layout); a
    trailing part may be empty."""
    step = math.ceil(size / parts)
    return [(min(i * step, size), min((i + 1) * step, size)) for i in range(parts)]
