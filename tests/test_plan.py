"""The partition pass and the plan file: placements, byte accounting, schema, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch

import memcompile
from memcompile.passes.partition import PartitionConfig, plan_model
from memcompile.runtime import (
    BandwidthModel,
    MemcompileError,
    Mesh,
    Plan,
    load_plan,
    save_plan,
)
from memcompile.runtime.plan import SCHEMA_PATH, model_fingerprint

import models  # noqa: F401  (puts examples/ on sys.path)
from tiny_transformer import TinyConfig, build_model


def tiny():
    return build_model(0, TinyConfig(d_model=64, d_hidden=128, n_layers=3))


def converted(mem_size="64K", layers=(0, 1), **options):
    return memcompile.transform(tiny(), layers=list(layers), mem_size=mem_size, **options)


def covers_table(table) -> bool:
    """Every element of the table is held by exactly `replicas` ranks."""
    count = torch.zeros(table.rows, table.v_dim, dtype=torch.int32)
    for shard in table.shards:
        count[shard.rows[0] : shard.rows[1], shard.cols[0] : shard.cols[1]] += 1
    return bool((count == table.replicas).all())


@pytest.mark.parametrize("strategy", ["replicate", "colwise", "rowwise"])
@pytest.mark.parametrize("mesh", [Mesh(2), Mesh(4), Mesh(2, nodes=2), Mesh(3)])
def test_shards_tile_the_table_and_bytes_add_up(strategy, mesh):
    model = converted()
    plan = memcompile.plan(model, mesh.gpus_per_node, mesh.nodes, strategy=strategy)
    (table,) = plan.tables
    values = model.memcompile_pool.values
    assert table.name == "memcompile_pool.values"
    assert (table.rows, table.v_dim) == tuple(values.shape)
    assert set(table.readers) == {"blocks.0.mlp", "blocks.1.mlp"}
    assert table.group_size * table.replicas == mesh.world_size
    assert covers_table(table)
    total = sum(s.bytes for s in table.shards)
    assert total == values.numel() * values.element_size() * table.replicas


def test_plan_counts_memory_per_rank():
    model = converted()
    plan = memcompile.plan(model, 4, strategy="colwise", tokens_per_step=512)
    (table,) = plan.tables
    values = model.memcompile_pool.values
    dense = [p for n, p in model.named_parameters() if n != table.name]
    dense_bytes = sum(p.numel() * p.element_size() for p in dense)
    for rank in plan.ranks:
        shard = table.shards[rank.rank]
        shard_bytes = (shard.cols[1] - shard.cols[0]) * values.shape[0] * values.element_size()
        # FSDP2 holds 1/world of the dense weights; the rank holds its column shard.
        assert rank.weights == -(-dense_bytes // 4) + shard_bytes
        assert rank.gradients == rank.weights
        elements = -(-sum(p.numel() for p in dense) // 4) + shard_bytes // 4
        assert rank.optimizer_state == 8 * elements
        assert rank.activations > 0
    assert plan.dense.strategy == "fully_shard"
    assert plan.dense.units == ("blocks.0", "blocks.1", "blocks.2", "")


def test_colwise_collective_bytes_follow_the_tokens():
    model = converted()
    tokens = 1024
    plan = memcompile.plan(model, 4, strategy="colwise", tokens_per_step=tokens)
    (table,) = plan.tables
    t, picks = tokens // 4, table.picks
    by_name = {c.name: c for c in table.collectives}
    assert by_name["indices"].bytes_by_rank == (3 * t * picks * 8,) * 4
    assert by_name["weights"].bytes_by_rank == (3 * t * picks * 4,) * 4
    assert by_name["outputs"].bytes_by_rank == (3 * t * (table.v_dim // 4) * 4,) * 4
    assert all(c.per_step == 2 for c in table.collectives)  # two layers read the table
    infer = memcompile.plan(model, 4, mode="infer", strategy="colwise", tokens_per_step=tokens)
    assert {c.phase for c in infer.tables[0].collectives} == {"forward"}


def test_the_chosen_placement_is_the_fastest_that_fits():
    model = converted()
    plan = memcompile.plan(model, 4, nodes=2, tokens_per_step=4096)
    (table,) = plan.tables
    chosen_time = plan.time_breakdown_s["memory_tables"]
    for alternative in table.alternatives:
        assert not alternative.fits or alternative.step_time_s >= chosen_time
    assert table.strategy in table.reason


def test_plan_of_a_path_names_what_it_takes():
    with pytest.raises(MemcompileError, match=r"plan takes the converted model .* got str"):
        memcompile.plan("ckpt", 2)


def test_a_table_too_big_says_how_many_gpus_it_needs():
    model = converted(mem_size="256K")
    values = model.memcompile_pool.values.numel() * 4
    # Training holds the table 4 times (values, gradient, two AdamW moments): 2 GPUs with
    # half a table's memory each cannot, a few more can.
    gpu_memory = int(values * 0.5 / 0.9)
    with pytest.raises(MemcompileError, match=r"needs at least (\d+) GPUs") as error:
        memcompile.plan(model, 2, gpu_memory=gpu_memory, tokens_per_step=64)
    assert "\n" not in str(error.value)
    needed = int(str(error.value).split("needs at least ")[1].split()[0])
    assert needed > 2
    memcompile.plan(model, needed, gpu_memory=gpu_memory, tokens_per_step=64)
    with pytest.raises(MemcompileError):
        memcompile.plan(model, needed - 1, gpu_memory=gpu_memory, tokens_per_step=64)


def test_inference_falls_back_to_host_memory_when_no_gpu_holds_the_table():
    model = converted(mem_size="256K")
    values = model.memcompile_pool.values.numel() * 4
    plan = memcompile.plan(model, 1, mode="infer", gpu_memory=values // 2, tokens_per_step=8)
    (table,) = plan.tables
    assert table.strategy == "host"
    assert table.shards[0].bytes == 0
    assert {c.link for c in table.collectives} == {"host_link"}
    assert plan.dense.strategy == "replicate"
    assert all(rank.gradients == 0 and rank.optimizer_state == 0 for rank in plan.ranks)


def test_own_value_tables_are_planned_one_by_one():
    model = converted(share_values=False)
    plan = memcompile.plan(model, 2, strategy="rowwise")
    assert sorted(t.name for t in plan.tables) == ["blocks.0.mlp.values", "blocks.1.mlp.values"]
    assert all(len(t.readers) == 1 and covers_table(t) for t in plan.tables)


def test_plan_file_round_trips_and_matches_the_schema(tmp_path):
    model = converted()
    plan = memcompile.plan(model, 2, nodes=2)
    path = save_plan(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))  # independent of load_plan
    assert data["format"] == "memcompile.plan" and data["version"] == 1
    assert data["mesh"]["world_size"] == 4
    assert data["model_fingerprint"] == model_fingerprint(model)
    assert load_plan(path) == plan
    refused = r"already exists: .* pass force=True \(--force\)"
    with pytest.raises(memcompile.MemcompileError, match=refused):
        save_plan(plan, path)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(memcompile.MemcompileError, match="is a directory"):
        save_plan(plan, tmp_path / "ckpt", force=True)
    assert (tmp_path / "ckpt").is_dir() and load_plan(save_plan(plan, path, force=True)) == plan


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d.pop("tables"), "'tables' is a required property"),
        (lambda d: d["tables"][0].update(strategy="diagonal"), "tables/0/strategy"),
        (lambda d: d["mesh"].update(world_size=3), "world_size"),
        (lambda d: d["tables"][0]["shards"].pop(), "one shard per rank"),
        (lambda d: d.update(format="other"), "not a memcompile plan"),
        (lambda d: d["mesh"].update(nodes=1.0), "sizes must be integers"),
        (lambda d: d["mesh"].update(nodes=10**9, world_size=2 * 10**9), "more than 1,048,576"),
    ],
)
def test_a_bad_plan_file_is_refused_with_one_line(tmp_path, corrupt, message):
    data = memcompile.plan(converted(), 2).to_json()
    corrupt(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MemcompileError, match=message) as error:
        load_plan(path)
    assert "\n" not in str(error.value)


def test_not_json_and_missing_files_are_refused(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MemcompileError, match="is not JSON"):
        load_plan(tmp_path / "bad.json")
    # Python's json writes and reads Infinity; JSON has no such number
    data = memcompile.plan(converted(), 2).to_json()
    data["bandwidth"]["intra_node"] = float("inf")
    (tmp_path / "inf.json").write_text(json.dumps(data))
    with pytest.raises(MemcompileError, match="Infinity is not a JSON number"):
        load_plan(tmp_path / "inf.json")
    with pytest.raises(MemcompileError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MemcompileError, match="is not JSON .maximum recursion depth"):
        load_plan(tmp_path / "deep.json")
    with pytest.raises(MemcompileError, match="a mesh of 2,000,000 GPUs is more than a plan"):
        memcompile.plan(converted(), 1_000_000, nodes=2)


def test_fingerprint_tells_models_apart():
    a, b = converted(), converted(mem_size="16K")
    assert model_fingerprint(a) == model_fingerprint(converted())
    assert model_fingerprint(a) != model_fingerprint(b)


def test_bad_settings_are_refused():
    model = converted()
    with pytest.raises(MemcompileError, match="mode must be one of"):
        memcompile.plan(model, 2, mode="serve")
    with pytest.raises(MemcompileError, match="inference only"):
        memcompile.plan(model, 2, strategy="host")
    with pytest.raises(MemcompileError, match="gpus_per_node must be a positive"):
        memcompile.plan(model, 0)
    for bad in (float("inf"), float("nan"), 0):
        with pytest.raises(MemcompileError, match="intra_node must be a positive finite"):
            BandwidthModel(intra_node=bad)
    assert Mesh(np.int64(2), nodes=np.int32(3)).world_size == 6  # numpy integers too
    with pytest.raises(MemcompileError, match="not a memory size"):
        memcompile.plan(model, 2, gpu_memory="lots")
    for kwargs, message in [
        (dict(tokens_per_step=1.5), "tokens_per_step must be an integer >= 1, got 1.5"),
        (dict(tokens_per_step=0), "tokens_per_step must be an integer >= 1, got 0"),
        (dict(tokens_per_step=True), "tokens_per_step must be an integer"),
        (dict(tokens_per_step="65536"), "tokens_per_step must be an integer"),
        (dict(bandwidth={"hbm": 3e12}), "bandwidth takes a memcompile.runtime.BandwidthModel"),
    ]:
        with pytest.raises(MemcompileError, match=message):
            memcompile.plan(model, 2, **kwargs)
    with pytest.raises(MemcompileError, match="optimizer_bytes_per_param must be an integer"):
        PartitionConfig(Mesh(2), optimizer_bytes_per_param=-1)
    with pytest.raises(MemcompileError, match="no memory layers"):
        memcompile.plan(tiny(), 2)
    config = PartitionConfig(Mesh(2))
    with pytest.raises(MemcompileError, match="headroom"):
        replace(config, headroom=1.5)


def test_plan_of_a_lazy_table_needs_no_memory():
    """Planning reads shapes only: a 16M-row table on the meta device plans fine."""
    model = converted(mem_size="16M", lazy_init=True)
    assert model.memcompile_pool.values.is_meta
    plan = plan_model(model, PartitionConfig(Mesh(8), tokens_per_step=16384))
    assert plan.tables[0].rows == 16 * 2**20
    assert isinstance(Plan.from_json(plan.to_json()), Plan)


def test_strategy_can_be_forced_per_table():
    model = converted(share_values=False)
    forced = {"blocks.0.mlp.values": "rowwise", "blocks.1.mlp.values": "replicate"}
    plan = memcompile.plan(model, 2, strategy=forced)
    assert {t.name: t.strategy for t in plan.tables} == forced
    with pytest.raises(MemcompileError, match="not a value table of the model"):
        memcompile.plan(model, 2, strategy={"blocks.9.mlp.values": "colwise"})
    with pytest.raises(MemcompileError, match="strategy must be one of"):
        memcompile.plan(model, 2, strategy={"blocks.0.mlp.values": "striped"})
