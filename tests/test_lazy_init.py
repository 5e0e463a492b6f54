"""Lazy value tables: stored as an init recipe, built chunk by chunk, the same tensor as an
eager init whatever the chunk size."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import memcompile
from memcompile.cli import main
from memcompile.runtime import MemoryConfig, MemoryLayer, MemoryPool, materialize_values
from memcompile.runtime.init import ROWS_PER_BLOCK

from models import CASES, VOCAB, build

LLAMA = next(c for c in CASES if c.name == "llama")
OPTIONS = dict(mem_size=128**2, knn=4, heads=2)  # 16,384 rows: several init blocks


@pytest.mark.parametrize("chunk_rows", [1, 1000, ROWS_PER_BLOCK, 5000, 128**2])
def test_materialised_table_does_not_depend_on_the_chunk_size(chunk_rows):
    eager = MemoryPool(128**2, 8, seed=3)
    lazy = MemoryPool(128**2, 8, seed=3, lazy=True)
    assert lazy.values.is_meta
    built = lazy.values_init.materialize((128**2, 8), torch.float32, "cpu", chunk_rows)
    assert torch.equal(built, eager.values.detach())
    assert built.std().item() == pytest.approx(8**-0.5, rel=0.02)


@pytest.mark.parametrize("chunk_rows", [0, -1, 2.5])
def test_a_bad_chunk_size_is_refused_and_builds_nothing(chunk_rows):
    model = memcompile.transform(build(LLAMA), [1], lazy_init=True, **OPTIONS)
    with pytest.raises(memcompile.MemcompileError, match="chunk_rows must be an int >= 1"):
        materialize_values(model, chunk_rows=chunk_rows)
    assert all(v.is_meta for v in memcompile.memory_values(model))


@pytest.mark.parametrize("share", [True, False])
def test_lazy_transform_then_materialise_equals_eager(share):
    eager = memcompile.transform(build(LLAMA), [0, 2], share_values=share, **OPTIONS)
    lazy = memcompile.transform(build(LLAMA), [0, 2], share_values=share, lazy_init=True, **OPTIONS)
    metas = [n for n, p in lazy.named_parameters() if p.is_meta]
    assert metas and all(n.endswith("values") for n in metas)
    assert len(metas) == (1 if share else 2)
    assert materialize_values(lazy) == len(metas)
    for name, tensor in eager.state_dict().items():
        assert torch.equal(tensor, lazy.state_dict()[name]), name


def test_single_layer_lazy_values():
    config = MemoryConfig(mem_size=64**2, knn=4, heads=2).resolve(16)
    eager = MemoryLayer(16, 16, config, seed=5)
    lazy = MemoryLayer(16, 16, config, seed=5, lazy_values=True)
    assert lazy.values.is_meta and not lazy.keys.is_meta
    materialize_values(lazy, chunk_rows=777)
    assert torch.equal(lazy.values, eager.values)
    x = torch.randn(3, 16)
    assert torch.equal(lazy(x), eager(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_lazy_table_saved_after_a_dtype_change_loads_in_that_dtype(dtype, tmp_path):
    model = memcompile.transform(build(LLAMA), [1], lazy_init=True, **OPTIONS).to(dtype)
    memcompile.save(model, tmp_path / "ckpt")
    loaded = memcompile.load(tmp_path / "ckpt")
    materialize_values(model)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    want = {n: p for n, p in model.named_parameters()}
    for name, param in loaded.named_parameters():  # the lazy table too, built in `dtype`
        assert torch.equal(param, want[name]), name


def test_cli_lazy_init_stores_the_recipe_and_loads_the_same_model(tmp_path):
    source = tmp_path / "hf"
    build(LLAMA).save_pretrained(source)
    args = [
        "convert",
        str(source),
        "--layers",
        "0,2",
        "--mem-size",
        str(128**2),
        "--knn",
        "4",
        "--heads",
        "2",
        "--quiet",
    ]
    lazy_out, eager_out = tmp_path / "lazy", tmp_path / "eager"
    assert CliRunner().invoke(main, [*args, "--lazy-init", "-o", str(lazy_out)]).exit_code == 0
    assert CliRunner().invoke(main, [*args, "-o", str(eager_out)]).exit_code == 0

    manifest = json.loads((lazy_out / "memcompile.json").read_text())
    assert list(manifest["lazy_values"]) == ["memcompile_pool.values"]
    assert manifest["lazy_values"]["memcompile_pool.values"]["shape"] == [128**2, 32]
    with safe_open(str(lazy_out / "model.safetensors"), "pt") as stored:
        assert "memcompile_pool.values" not in stored.keys()
    lazy_size = (lazy_out / "model.safetensors").stat().st_size
    eager_size = (eager_out / "model.safetensors").stat().st_size
    assert eager_size - lazy_size >= 128**2 * 32 * 4

    from_lazy, from_eager = memcompile.load(lazy_out), memcompile.load(eager_out)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(LLAMA.logits(from_lazy, ids), LLAMA.logits(from_eager, ids))
    assert memcompile.load(lazy_out, materialize=False).memcompile_pool.values.is_meta


def test_inspect_lists_a_lazy_checkpoint_without_building_its_tables(tmp_path, monkeypatch):
    from memcompile.runtime import init

    source, lazy_out = tmp_path / "hf", tmp_path / "lazy"
    build(LLAMA).save_pretrained(source)
    args = ["convert", str(source), "--layers", "0", "--mem-size", "16K", "--knn", "4",
            "--heads", "2", "--lazy-init", "--quiet", "-o", str(lazy_out)]  # fmt: skip
    assert CliRunner().invoke(main, args).exit_code == 0

    def no_build(*_, **__):  # a large lazy table would not fit in memory
        raise AssertionError("inspect built a value table")

    monkeypatch.setattr(init.ValuesInit, "materialize", no_build)
    listed = CliRunner().invoke(main, ["inspect", str(lazy_out), "--json"])
    assert listed.exit_code == 0, listed.output
    (memory,) = json.loads(listed.output)["memory_layers"]
    assert memory["rows"] == 16384 and memory["path"] == "model.layers.0.mlp"


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_a_table_not_built_yet_is_refused_with_the_fix(grad):
    layer = MemoryLayer(8, 8, MemoryConfig(mem_size=16, heads=2, knn=3, k_dim=6), lazy_values=True)
    with torch.set_grad_enabled(grad), pytest.raises(memcompile.MemcompileError) as error:
        layer(torch.randn(2, 8))
    assert "materialize_values" in str(error.value) and "\n" not in str(error.value)
    materialize_values(layer)
    with torch.set_grad_enabled(grad):
        assert torch.isfinite(layer(torch.randn(2, 8))).all()


def test_a_table_too_large_to_allocate_names_lazy_init():
    # 32 PiB: more than any address space, so the allocation fails whatever the overcommit.
    with pytest.raises(memcompile.MemcompileError, match=r"lazy_init=True") as error:
        MemoryPool(2**50, 8)
    assert "33,554,432.0 GiB" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("more", [["--lazy-init"], ["--no-share"]], ids=["lazy", "own-table"])
def test_converting_more_layers_of_a_lazy_checkpoint_keeps_its_recipe(tmp_path, monkeypatch, more):
    from memcompile.runtime import init

    source, first, second = tmp_path / "hf", tmp_path / "first", tmp_path / "second"
    build(LLAMA).save_pretrained(source)
    small = ["--mem-size", "16K", "--knn", "4", "--heads", "2", "--quiet"]
    args = ["convert", str(source), "--layers", "0", *small, "--lazy-init", "-o", str(first)]
    assert CliRunner().invoke(main, args).exit_code == 0
    if more == ["--lazy-init"]:  # nothing is built: the table may not fit in memory here

        def no_build(*_, **__):
            raise AssertionError("convert built a lazy value table")

        monkeypatch.setattr(init.ValuesInit, "materialize", no_build)
    args = ["convert", str(first), "--layers", "2", *small, *more, "-o", str(second)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    monkeypatch.undo()

    manifest = json.loads((second / "memcompile.json").read_text())
    assert "memcompile_pool.values" in manifest["lazy_values"]
    with safe_open(str(second / "model.safetensors"), "pt") as stored:
        assert "memcompile_pool.values" not in stored.keys()
        own_table = [k for k in stored.keys() if k.endswith(".values")]
    assert own_table == (["model.layers.2.mlp.values"] if more == ["--no-share"] else [])
    before, after = memcompile.load(first), memcompile.load(second)
    assert torch.equal(before.memcompile_pool.values, after.memcompile_pool.values)


def test_a_stored_recipe_too_large_to_build_does_not_advise_lazy_init():
    # Building a checkpoint's recipe (load, export, calibrate): the table is lazy already.
    from memcompile.runtime.init import ValuesInit

    with pytest.raises(memcompile.MemcompileError) as error:
        ValuesInit(std=1.0, seed=0).materialize((2**50, 8))
    assert "does not fit in memory here" in str(error.value)
    assert "lazy" not in str(error.value)


def test_more_layers_on_a_lazy_shared_table_share_it_and_round_trip(tmp_path):
    # The new layers' table is the pool's, unbuilt: verify must not probe it.
    model = build(LLAMA)
    memcompile.transform(model, [1], **OPTIONS, lazy_init=True)
    memcompile.transform(model, [2], **OPTIONS)
    assert [step["layers"] for step in model.memcompile_recipe] == [[1], [2]]
    assert model.memcompile_pool.values.is_meta
    loaded = memcompile.load(memcompile.save(model, tmp_path / "ckpt"))
    materialize_values(model)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(LLAMA.logits(loaded, ids), LLAMA.logits(model, ids))
