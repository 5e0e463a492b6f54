"""The flow the README gives for running a plan: `memcompile plan CKPT` on a checkpoint whose
table is stored as its init recipe, then on each rank `memcompile.load(ckpt,
materialize=False)` and `apply_plan` — each rank builds only its shard, and the sharded
model gives the outputs of the whole model. Also the `host` strategy (inference)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from dist_util import run_ranks

import memcompile
from memcompile.cli import main
from memcompile.runtime import apply_plan, load_plan

from models import CASES, VOCAB, build

LLAMA = next(c for c in CASES if c.name == "llama")
WORLD = 2
POOL = "memcompile_pool.values"


def _ids(rank: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(rank))


def plan_worker(rank, world, ckpt, plan_path):
    model = memcompile.load(ckpt, materialize=False)
    assert model.memcompile_pool.values.is_meta  # the checkpoint holds only the recipe
    model = apply_plan(model, load_plan(plan_path))
    values = model.memcompile_pool.values
    local = values.to_local() if hasattr(values, "to_local") else values
    with torch.no_grad():
        logits = model(_ids(rank)).logits
    return {"logits": logits, "shard": local.detach().clone(), "device": str(local.device)}


@pytest.fixture(scope="module")
def lazy_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow") / "ckpt"
    model = build(LLAMA)
    memcompile.transform(model, layers=[0, 2], mem_size="4K", knn=4, heads=2, lazy_init=True)
    memcompile.save(model, path)
    return path


@pytest.mark.parametrize("strategy, mode", [("colwise", "train"), ("rowwise", "infer"),
                                            ("host", "infer")])  # fmt: skip
def test_plan_a_lazy_checkpoint_then_run_it_on_two_ranks(lazy_ckpt, tmp_path, strategy, mode):
    plan_path = tmp_path / "plan.json"
    result = CliRunner().invoke(main, [
        "plan", str(lazy_ckpt), "--gpus", str(WORLD), "--mode", mode, "--strategy", strategy,
        "--quiet", "-o", str(plan_path),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = load_plan(plan_path)
    results = run_ranks(plan_worker, WORLD, str(lazy_ckpt), str(plan_path))

    whole = memcompile.load(lazy_ckpt)  # the table built in one piece from the same recipe
    table = whole.memcompile_pool.values.detach()
    for rank, got in enumerate(results):
        shard = plan.table(POOL).shards[rank]
        (r0, r1), (c0, c1) = shard.rows, shard.cols
        assert torch.equal(got["shard"], table[r0:r1, c0:c1])
        assert got["device"] == "cpu"
        with torch.no_grad():
            want = whole(_ids(rank)).logits
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow") / "bf16"
    model = build(LLAMA).to(torch.bfloat16)
    memcompile.transform(model, layers=[0, 2], mem_size="4K", knn=4, heads=2, lazy_init=True)
    memcompile.save(model, path)
    return path


def test_a_bfloat16_table_split_by_rows_gives_the_one_process_result(bf16_ckpt, tmp_path):
    # Each rank sums the picks it holds; the partial sums cross in float32, so the result is
    # rounded to bfloat16 once, as in one process (it was rounded per rank first: logits
    # of at most 0.44 were 0.14 off).
    plan_path = tmp_path / "plan.json"
    result = CliRunner().invoke(main, [
        "plan", str(bf16_ckpt), "--gpus", str(WORLD), "--mode", "infer", "--strategy",
        "rowwise", "--quiet", "-o", str(plan_path),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = run_ranks(plan_worker, WORLD, str(bf16_ckpt), str(plan_path))
    whole = memcompile.load(bf16_ckpt)
    for rank, got in enumerate(results):
        with torch.no_grad():
            want = whole(_ids(rank)).logits
        assert got["logits"].dtype == torch.bfloat16
        # Equal here; the float32 sums' order may still flip a rounding, never by 0.14.
        torch.testing.assert_close(got["logits"], want, rtol=0, atol=2e-2)
