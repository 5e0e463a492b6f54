"""What one step costs a memory table under each strategy: collectives, bytes per rank, time.

The collectives are the ones `runtime/sharded_bag.py` issues, in its order, and the byte
counts are exact for the fixed-size ones (the distributed tests count them); the routed
pairs of `rowwise` depend on the indices and are given for uniformly spread rows.
Notation: G ranks share a table (its shard group), R = world / G groups hold replicas of
it, t tokens per rank, P = heads * knn rows picked per token by each of L reading layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.plan import BandwidthModel, Collective, Mesh, Shard, chunk_ranges

INT64, FLOAT32, INT32 = 8, 4, 4
PAIR_BYTES = 3 * INT32  # a routed pick: local row, source token, weight (rowwise)


@dataclass(frozen=True)
class Table:
    """A value table of the model, as the planner sees it."""

    name: str
    rows: int
    v_dim: int
    dtype: torch.dtype
    readers: tuple[str, ...]
    picks: int
    query_width: int  # heads * k_dim of a reader

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.rows * self.v_dim * self.element_size


@dataclass(frozen=True)
class Option:
    """One way to place a table, with what it costs each rank per step."""

    strategy: str
    group_size: int
    shards: tuple[Shard, ...]
    collectives: tuple[Collective, ...]
    weights: tuple[int, ...]  # bytes per rank
    gradients: tuple[int, ...]
    optimizer_state: tuple[int, ...]
    activations: tuple[int, ...]
    host_bytes: int  # host memory per node (strategy "host")
    step_time_s: float

    @property
    def replicas(self) -> int:
        return len(self.shards) // self.group_size

    def rank_bytes(self, rank: int) -> int:
        return (
            self.weights[rank]
            + self.gradients[rank]
            + self.optimizer_state[rank]
            + self.activations[rank]
        )


def links(mesh: Mesh, group_size: int) -> tuple[str, str]:
    """The link of the shard group (G consecutive ranks) and of the replica group (ranks
    r, r+G, ...): NVLink when the group stays inside a node."""
    inside = group_size <= mesh.gpus_per_node and mesh.gpus_per_node % group_size == 0
    shard = "intra_node" if inside else "inter_node"
    replica = "inter_node" if mesh.nodes > 1 else "intra_node"
    return shard, replica


def _shards(table: Table, mesh: Mesh, strategy: str, group_size: int) -> tuple[Shard, ...]:
    full_rows, full_cols = (0, table.rows), (0, table.v_dim)
    if strategy == "colwise":
        ranges = chunk_ranges(table.v_dim, group_size)
        spans = [(full_rows, ranges[r % group_size]) for r in range(mesh.world_size)]
    elif strategy == "rowwise":
        ranges = chunk_ranges(table.rows, group_size)
        spans = [(ranges[r % group_size], full_cols) for r in range(mesh.world_size)]
    else:
        spans = [(full_rows, full_cols)] * mesh.world_size
    size = table.element_size
    on_gpu = strategy != "host"
    return tuple(
        Shard(r, rows, cols, on_gpu * (rows[1] - rows[0]) * (cols[1] - cols[0]) * size)
        for r, (rows, cols) in enumerate(spans)
    )


def collectives(
    table: Table, mesh: Mesh, strategy: str, group_size: int, mode: str, tokens: int
) -> tuple[Collective, ...]:
    """The collectives a step issues for `table`; `tokens` per rank."""
    world, G = mesh.world_size, group_size
    R = world // G
    t, P, e, L = tokens, table.picks, table.element_size, len(table.readers)
    shard_link, replica_link = links(mesh, G)
    shards = _shards(table, mesh, strategy, G)
    width = [s.cols[1] - s.cols[0] for s in shards]
    height = [s.rows[1] - s.rows[0] for s in shards]
    train = mode == "train"
    out: list[Collective] = []

    def add(name, op, phase, per_rank, group="shard", link=shard_link, dependent=False):
        bytes_by_rank = tuple(int(b) for b in per_rank)
        out.append(Collective(name, op, group, phase, L, bytes_by_rank, link, dependent))

    if strategy == "colwise" and G > 1:
        add("token_counts", "all_gather_into_tensor", "forward", [(G - 1) * INT64] * world)
        add("indices", "all_gather_into_tensor", "forward", [(G - 1) * t * P * INT64] * world)
        add("weights", "all_gather_into_tensor", "forward", [(G - 1) * t * P * FLOAT32] * world)
        add("outputs", "all_to_all_single", "forward", [(G - 1) * t * w * e for w in width])
        if train:
            add("grad_outputs", "all_to_all_single", "backward",
                [t * (table.v_dim - w) * e for w in width])  # fmt: skip
            add("grad_weights", "all_to_all_single", "backward",
                [(G - 1) * t * P * FLOAT32] * world)  # fmt: skip
    elif strategy == "rowwise" and G > 1:
        off_rank = [(table.rows - h) / table.rows for h in height]
        on_rank = [h / table.rows for h in height]
        add("pair_counts", "all_to_all_single", "forward", [(G - 1) * 2 * INT64] * world)
        add("routed_pairs", "all_to_all_single", "forward",
            [t * P * f * PAIR_BYTES for f in off_rank], dependent=True)  # fmt: skip
        summed = max(e, FLOAT32)  # partial sums travel in the accumulation dtype
        add("partial_sums", "all_to_all_single", "forward",
            [(G - 1) * t * table.v_dim * summed] * world)  # fmt: skip
        if train:
            add("grad_outputs", "all_to_all_single", "backward",
                [(G - 1) * t * table.v_dim * e] * world)  # fmt: skip
            add("grad_weights", "all_to_all_single", "backward",
                [(G - 1) * t * P * f * FLOAT32 for f in on_rank], dependent=True)  # fmt: skip
    elif strategy == "host":
        # The GPU reads the picked rows from pinned host memory (zero-copy): only they cross.
        add("rows_from_host", "host_copy", "forward", [t * P * table.v_dim * e] * world,
            group="host", link="host_link")  # fmt: skip
    if train and R > 1:
        # The same shard on every replica group gets its own gradient: average them.
        grads = [h * w * e for h, w in zip(height, width)]
        group = "world" if G == 1 else "replica"
        out.append(
            Collective(
                "value_grads", "all_reduce", group, "step", 1,
                tuple(2 * (R - 1) * b // R for b in grads), replica_link,
            )
        )  # fmt: skip
    return tuple(out)


def option(
    table: Table,
    mesh: Mesh,
    strategy: str,
    group_size: int,
    mode: str,
    tokens: int,
    bandwidth: BandwidthModel,
    optimizer_bytes_per_param: int,
) -> Option:
    """Memory per rank and estimated step time of one placement of `table`."""
    shards = _shards(table, mesh, strategy, group_size)
    comms = collectives(table, mesh, strategy, group_size, mode, tokens)
    train = mode == "train"
    t, P, e, L = tokens, table.picks, table.element_size, len(table.readers)
    elements = [s.bytes // e for s in shards]
    weights = tuple(s.bytes for s in shards)
    gradients = weights if train else (0,) * len(shards)
    optimizer = tuple(n * optimizer_bytes_per_param if train else 0 for n in elements)
    # Saved for backward per reader: the query, picks and probabilities, the bag output and
    # the gate; colwise also keeps the gathered picks of its group. Inference keeps one
    # reader's transient tensors at a time.
    per_reader = t * (table.query_width * e + P * (INT64 + FLOAT32) + 2 * table.v_dim * e)
    if strategy == "colwise":
        per_reader += group_size * t * P * (INT64 + FLOAT32)
    elif strategy == "rowwise":
        per_reader += t * P * PAIR_BYTES
    activations = (per_reader * (L if train else 1),) * len(shards)

    rank_time = []
    for rank in range(mesh.world_size):
        seconds = 0.0
        for c in comms:
            rate = getattr(bandwidth, c.link)
            seconds += c.bytes_per_step(rank) / rate
        rows_read = t * P * table.v_dim * e * L  # the bag reads every picked row (all columns)
        if strategy == "host":
            seconds += rows_read / bandwidth.host_memory
        else:
            seconds += rows_read * (3 if train else 1) / bandwidth.hbm
        if train:
            # Optimizer: parameter read+write, gradient read, state read+write.
            seconds += elements[rank] * (3 * e + 2 * optimizer_bytes_per_param) / bandwidth.hbm
        rank_time.append(seconds)
    host_bytes = table.nbytes * mesh.gpus_per_node if strategy == "host" else 0
    return Option(
        strategy, group_size, shards, comms, weights, gradients, optimizer, activations,
        host_bytes, max(rank_time),
    )  # fmt: skip
