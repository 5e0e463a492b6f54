"""Fused value updates (`memcompile.fuse_value_updates`): each step against an independent
float64 optimizer on the dense gradient, restricted to the touched rows; schedules,
clipping, column shards in two processes, resuming, bad arguments. Steps with several
lookups or backward passes: test_fused_readers.py."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from fused_reference import (
    EXAMPLE,
    SMALL,
    Reference,
    assert_close64,
    dense_gradient,
    fused_step,
    make_batch,
    pool_model,
    token_ids,
)
from torch import nn

import memcompile
from memcompile import MemcompileError
from memcompile.kernels import ops
from memcompile.runtime.fused_table import FusedTable, ValueOptimizer
from memcompile.runtime.fused_values import fused_value_ids

from models import build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_steps_match_the_float64_reference_and_untouched_rows_keep_everything(name, weight_decay):
    values = nn.Parameter(torch.randn(40, 12))
    table = FusedTable(values, ValueOptimizer(name, 0.05, weight_decay=weight_decay))
    ref = Reference(values, name, 0.05, weight_decay=weight_decay)
    for seed in range(3):
        idx, w, go = make_batch(40, 12, seed)
        if seed == 1:
            idx[idx < 20] += 20  # rows 0-19 sit this step out: lazy moments, no decay
        state_before = {k: v.clone() for k, v in table.state.items()}
        before = values.detach().clone()
        grad_w = fused_step(table, idx, w, go)
        _, want_w = ops.bag_backward(go, before, idx, w)  # read before the step
        torch.testing.assert_close(grad_w, want_w)
        ref.step(*dense_gradient(40, [(idx, w, go)]))
        assert_close64(values.detach(), ref.w)
        untouched = ~dense_gradient(40, [(idx, w, go)])[1]
        assert torch.equal(values.detach()[untouched], before[untouched])
        for key, state in table.state.items():
            assert torch.equal(state[untouched], state_before[key][untouched])
    assert values.grad is None and table.step == 3
    if name == "adam":
        assert_close64(table.state["exp_avg"], ref.m)
        assert_close64(table.state["exp_avg_sq"], ref.v)
    else:
        assert_close64(table.state["sum"], ref.sum)


def test_initial_accumulator_value_starts_every_rows_adagrad_sum():
    values = nn.Parameter(torch.randn(40, 12))
    rule = ValueOptimizer("rowwise_adagrad", 0.05, initial_accumulator_value=0.5)
    table = FusedTable(values, rule)
    ref = Reference(values, "rowwise_adagrad", 0.05, initial_sum=0.5)
    unstarted = Reference(values, "rowwise_adagrad", 0.05)
    for seed in range(2):
        batch = dense_gradient(40, [make_batch(40, 12, seed)])
        fused_step(table, *make_batch(40, 12, seed))
        ref.step(*batch)
        unstarted.step(*batch)
    assert_close64(values.detach(), ref.w)
    assert_close64(table.state["sum"], ref.sum)
    assert (ref.w - unstarted.w).abs().max() > 1e-2  # the starting sum changed the steps


def _warmup_then_halve(k: int) -> float:
    return min(1.0, (k + 1) / 3) * 0.5 ** max(0, k - 2)


def test_lr_lambda_schedules_adam_as_lambda_lr_schedules_torch_adamw():
    """Every row is read each step, so lazy Adam is AdamW: torch's, under LambdaLR."""
    values = nn.Parameter(torch.randn(8, 6))
    dense = nn.Parameter(values.detach().double().clone())
    table = FusedTable(values, ValueOptimizer("adam", 0.05, weight_decay=0.1),
                       lr_lambda=_warmup_then_halve)  # fmt: skip
    adamw = torch.optim.AdamW([dense], lr=0.05, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(adamw, _warmup_then_halve)
    for seed in range(6):
        idx, w, go = make_batch(8, 6, seed, n=4, picks=4)
        idx[0] = torch.arange(4)
        idx[1] = torch.arange(4, 8)
        assert table.lr == pytest.approx(schedule.get_last_lr()[0])
        fused_step(table, idx, w, go)
        dense.grad = dense_gradient(8, [(idx, w, go)])[0]
        adamw.step()
        schedule.step()
        assert_close64(values.detach(), dense.detach())


def test_lr_lambda_scales_each_rowwise_adagrad_step_and_refuses_a_bad_factor():
    values = nn.Parameter(torch.randn(40, 12))
    table = FusedTable(values, ValueOptimizer("rowwise_adagrad", 0.05),
                       lr_lambda=_warmup_then_halve)  # fmt: skip
    ref = Reference(values, "rowwise_adagrad", 0.05)
    for seed in range(5):
        idx, w, go = make_batch(40, 12, seed)
        ref.lr = 0.05 * _warmup_then_halve(seed)
        fused_step(table, idx, w, go)
        ref.step(*dense_gradient(40, [(idx, w, go)]))
        assert_close64(values.detach(), ref.w)
    table.lr_lambda = lambda k: -1.0
    before = values.detach().clone()
    with pytest.raises(MemcompileError, match=r"lr_lambda\(5\) returned -1.0: it must return"):
        fused_step(table, *make_batch(40, 12, 9))
    assert torch.equal(values.detach(), before) and table.step == 5


def test_a_colwise_table_in_replica_groups_is_refused_with_why(monkeypatch):
    """Colwise over a node of 2 ranks, 2 nodes: each replica would step on its own tokens."""
    from memcompile.runtime import fused_values
    from memcompile.runtime.sharded_bag import ShardedBag, ShardSpec

    model = pool_model()
    pool = model.memcompile_pool
    rows, v_dim = pool.values.shape
    spec = ShardSpec("memcompile_pool.values", "colwise", None, 2, 0, rows, v_dim)
    pool.bag_impl = ShardedBag(spec)
    monkeypatch.setattr(fused_values.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(fused_values.dist, "get_world_size", lambda group=None: 4)
    with pytest.raises(MemcompileError) as error:
        memcompile.fuse_value_updates(model, "adam", 0.05)
    assert "colwise over 2 of 4 ranks, in 2 replicas that would each step on their own" in str(
        error.value
    )
    assert "plan it colwise over the whole mesh" in str(error.value)


@pytest.mark.parametrize("name", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clipped", "under-the-bound"])
def test_max_grad_norm_clips_by_the_tables_own_gradient_norm(name, max_norm):
    values = nn.Parameter(torch.randn(30, 10))
    table = FusedTable(values, ValueOptimizer(name, 0.05, max_grad_norm=max_norm))
    ref = Reference(values, name, 0.05)
    for seed in range(2):
        batch = make_batch(30, 10, seed)
        fused_step(table, *batch)
        grad, touched = dense_gradient(30, [batch])
        ref.step(grad, touched, max_norm)
        torch.testing.assert_close(table.last_grad_norm.double(), grad.norm())
    assert_close64(values.detach(), ref.w)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _colwise_problem():
    values = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    return values, [make_batch(20, 10, seed, n=8, picks=4) for seed in range(3)]


OPTIMIZERS = [ValueOptimizer("rowwise_adagrad", 0.05, max_grad_norm=None),
              ValueOptimizer("rowwise_adagrad", 0.05, max_grad_norm=0.3),
              ValueOptimizer("adam", 0.05, weight_decay=0.1, max_grad_norm=0.3)]  # fmt: skip
COLUMNS = [slice(0, 6), slice(6, 10)]  # uneven shards


def _colwise_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values, batches = _colwise_problem()
    results = []
    for opt in OPTIMIZERS:
        shard = nn.Parameter(values[:, COLUMNS[rank]].clone())
        table = FusedTable(shard, opt, process_group=dist.group.WORLD)
        for idx, w, go in batches:
            fused_step(table, idx, w, go[:, COLUMNS[rank]])
        results.append({"values": shard.detach(), "state": table.state, "width": table.width})
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_column_shards_in_two_processes_equal_the_update_of_the_full_table(tmp_path):
    torch.multiprocessing.spawn(_colwise_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    shards = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    values, batches = _colwise_problem()
    for k, opt in enumerate(OPTIMIZERS):
        full = nn.Parameter(values.clone())
        table = FusedTable(full, opt)
        for batch in batches:
            fused_step(table, *batch)
        parts = [s[k] for s in shards]
        assert [p["width"] for p in parts] == [10, 10]
        got = torch.cat([p["values"] for p in parts], dim=1)
        torch.testing.assert_close(got, full.detach(), rtol=1e-6, atol=1e-6)
        if opt.name == "rowwise_adagrad":  # one state per row, the same on every rank
            for p in parts:
                torch.testing.assert_close(p["state"]["sum"], table.state["sum"])
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                both = torch.cat([p["state"][key] for p in parts], dim=1)
                torch.testing.assert_close(both, table.state[key])


@pytest.mark.parametrize(
    ("name", "dtype", "rounding"),
    [("rowwise_adagrad", None, False), ("adam", None, False), ("adam", "bfloat16", True)],
)
def test_resuming_from_state_dicts_gives_a_bit_identical_next_step(name, dtype, rounding, tmp_path):
    def make():
        model = build(EXAMPLE)
        memcompile.transform(model, layers=[0, 2], dtype=dtype, **SMALL)
        handle = memcompile.fuse_value_updates(
            model, name, 0.02, stochastic_rounding=rounding, lr_lambda=lambda k: 1.0 / (k + 1)
        )
        return model, handle, torch.optim.AdamW(memcompile.param_groups(model, 1e-3))

    def train(model, optimizer, seed):
        optimizer.zero_grad()
        EXAMPLE.loss(model, token_ids(seed)).backward()
        optimizer.step()

    def snapshot(model, handle):
        state = [t.clone() for table in handle.tables for t in table.state.values()]
        return [p.detach().clone() for p in model.parameters()] + state

    model, handle, optimizer = make()
    for seed in range(3):
        train(model, optimizer, seed)
    saved = {"model": model.state_dict(), "values_optimizer": handle.state_dict(),
             "optimizer": optimizer.state_dict()}  # fmt: skip
    torch.save(saved, tmp_path / "ckpt.pt")
    train(model, optimizer, 3)

    fresh, fresh_handle, fresh_optimizer = make()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh.load_state_dict(saved["model"])
    fresh_handle.load_state_dict(saved["values_optimizer"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    assert fresh_handle.step == 3 and fresh_handle.lr == pytest.approx(0.02 / 4)
    train(fresh, fresh_optimizer, 3)
    assert all(map(torch.equal, snapshot(model, handle), snapshot(fresh, fresh_handle)))


def test_bf16_values_keep_float32_state_and_round_to_the_nearest_or_stochastically():
    start = torch.randn(16, 64).bfloat16()
    idx, w, go = make_batch(16, 64, 0, n=32, picks=8)
    results = {}
    for rounding in (False, True):
        values = nn.Parameter(start.clone())
        table = FusedTable(values, ValueOptimizer("adam", 0.05, stochastic_rounding=rounding))
        fused_step(table, idx, w, go.bfloat16())
        assert values.dtype == torch.bfloat16 and table.state["exp_avg"].dtype == torch.float32
        results[rounding] = values.detach().double()
    ref = Reference(start, "adam", 0.05)
    ref.step(*dense_gradient(16, [(idx, w, go.bfloat16())]))
    torch.testing.assert_close(results[False], ref.w.bfloat16().double(), rtol=2**-8, atol=0)
    torch.testing.assert_close(results[True], ref.w, rtol=2**-7, atol=0)  # within one step
    assert not torch.equal(results[False], results[True])

    # Steps smaller than half a bf16 spacing: nearest rounding loses them, stochastic keeps
    # them on average.
    for rounding in (False, True):
        values = nn.Parameter(torch.ones(512, 64, dtype=torch.bfloat16))
        opt = ValueOptimizer("rowwise_adagrad", 1e-3, stochastic_rounding=rounding)
        table = FusedTable(values, opt)
        fused_step(table, torch.arange(512)[:, None], torch.ones(512, 1), torch.ones(512, 64))
        mean = values.detach().double().mean().item()
        assert mean == 1.0 if not rounding else abs(mean - (1 - 1e-3)) < 1e-4


def test_frozen_values_pass_the_weight_gradient_and_stay():
    values = nn.Parameter(torch.randn(10, 4), requires_grad=False)
    table = FusedTable(values, ValueOptimizer("adam", 0.1))
    idx, w, go = make_batch(10, 4, 1)
    before = values.clone()
    grad_w = fused_step(table, idx, w, go)
    torch.testing.assert_close(grad_w, ops.bag_backward(go, values, idx, w)[1])
    assert torch.equal(values, before) and table.step == 0


def test_param_groups_leave_fused_tables_out_and_remove_undoes_the_fusion():
    model = pool_model()
    handle = memcompile.fuse_value_updates(model, "rowwise_adagrad", 0.05)
    pool = model.memcompile_pool
    groups = memcompile.param_groups(model, lr=1e-3)
    assert [g["name"] for g in groups] == ["default"]
    assert all(p is not pool.values for p in groups[0]["params"])
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 1
    with pytest.raises(MemcompileError, match="are fused already: call remove"):
        memcompile.fuse_value_updates(model, "adam", 0.05)
    handle.remove()
    assert pool.bag_impl is None
    assert [g["name"] for g in memcompile.param_groups(model, lr=1e-3)] == [
        "default", "memory_values"]  # fmt: skip
    EXAMPLE.loss(model, token_ids(0)).backward()
    assert pool.values.grad is not None


def test_bad_arguments_are_one_line_errors():
    model = pool_model()
    for kwargs, message in [
        (dict(optimizer="sgd", lr=0.1), "unknown value optimizer 'sgd'"),
        (dict(optimizer="adam", lr=0.0), "lr must be positive"),
        (dict(optimizer="adam", lr=0.1, accumulation_steps=0), "accumulation_steps"),
        (dict(optimizer="adam", lr=0.1, accumulation_steps=True), "accumulation_steps"),
        (dict(optimizer="adam", lr=0.1, stochastic_rounding="yes"), "stochastic_rounding"),
        (dict(optimizer="adam", lr=0.1, max_grad_norm=-1.0), "max_grad_norm"),
        (dict(optimizer="adam", lr=0.1, betas=(0.9, 1.0)), "betas"),
        (dict(optimizer="adam", lr=float("inf")), "lr must be a finite number"),
        (dict(optimizer="adam", lr=True), "lr must be a finite number"),
        (dict(optimizer="adam", lr="0.05"), "lr must be a finite number"),
        (dict(optimizer="adam", lr=0.1, betas=(0.9,)), "betas must be a pair"),
        (dict(optimizer="adam", lr=0.1, weight_decay=None), "weight_decay must be a finite"),
        (dict(optimizer="adam", lr=0.1, lr_lambda=0.5), "lr_lambda takes a function"),
        (dict(optimizer="adam", lr=0.1, step_with=model), "step_with takes the torch.optim"),
        (dict(optimizer="rowwise_adagrad", lr=0.1, initial_accumulator_value=-1.0),
         "initial_accumulator_value must be >= 0"),
        (dict(optimizer="adam", lr=0.1, initial_accumulator_value=0.1),
         "initial_accumulator_value is row-wise Adagrad's"),
        (dict(optimizer="adam", lr=0.1, seed=-1), "seed must be an int in [0, 2**62)"),
        (dict(optimizer="adam", lr=0.1, seed=True), "seed must be an int"),
    ]:
        with pytest.raises(MemcompileError, match=re.escape(message)):
            memcompile.fuse_value_updates(model, **kwargs)
    with pytest.raises(MemcompileError, match="no memory value tables"):
        memcompile.fuse_value_updates(build(EXAMPLE), "adam", 0.1)
    lazy = build(EXAMPLE)
    memcompile.transform(lazy, layers=[1], lazy_init=True, **SMALL)
    with pytest.raises(MemcompileError, match="meta device"):
        memcompile.fuse_value_updates(lazy, "adam", 0.1)
    half_lazy = build(EXAMPLE)  # a built table, then a lazy one: the refusal fuses neither
    memcompile.transform(half_lazy, layers=[0], **{**SMALL, "share_values": False})
    memcompile.transform(half_lazy, layers=[1], lazy_init=True, **{**SMALL, "share_values": False})
    with pytest.raises(MemcompileError, match="meta device"):
        memcompile.fuse_value_updates(half_lazy, "adam", 0.1)
    assert fused_value_ids(half_lazy) == set()
    handle = memcompile.fuse_value_updates(model, "adam", 0.1)  # the refusals fused nothing
    with pytest.raises(MemcompileError, match="'rowwise_adagrad' value optimizer"):
        handle.load_state_dict({**handle.state_dict(), "tables": [
            {**handle.tables[0].state_dict(), "optimizer": "rowwise_adagrad"}]})  # fmt: skip


def test_a_bad_state_dict_loads_nothing_and_a_changed_dtype_is_named():
    model = pool_model()
    handle = memcompile.fuse_value_updates(model, "adam", 0.1, lr_lambda=lambda k: np.float32(0.5))
    assert handle.lr == pytest.approx(0.05)
    table = handle.tables[0]
    before = {name: t.clone() for name, t in table.state.items()}
    saved = table.state_dict()
    bad = {"exp_avg": saved["state"]["exp_avg"] + 1, "exp_avg_sq": torch.zeros(3)}
    for broken, message in [
        ({**saved, "state": bad}, r"'exp_avg_sq' is \(3,\), this table needs"),
        ({**saved, "state": {**saved["state"], "exp_avg": saved["state"]["exp_avg"] + 1},
          "step": "x"}, "integer 'step'"),
        ({**saved, "state": None}, "the adam optimizer keeps"),
        (None, "cannot be loaded"),
        ({**saved, "step": True}, "integer 'step'"),
        ({**saved, "state": {**saved["state"], "exp_avg_sq": saved["state"]["exp_avg_sq"] - 1}},
         "'exp_avg_sq' holds negative or NaN"),
        ({**saved, "state": {**saved["state"], "exp_avg": saved["state"]["exp_avg"].long()}},
         "'exp_avg' is torch.int64, not floating"),
    ]:  # fmt: skip
        with pytest.raises(MemcompileError, match=message):
            handle.load_state_dict({**handle.state_dict(), "tables": [broken]})
        assert all(torch.equal(t, before[name]) for name, t in table.state.items())
    with pytest.raises(MemcompileError, match="not the state of fused value updates"):
        handle.load_state_dict({**handle.state_dict(), "tables": 5})
    model.double()
    with pytest.raises(MemcompileError, match="values are torch.float64 now"):
        EXAMPLE.loss(model, token_ids(0)).backward()


def test_factual_recall_example_compares_value_optimizers(tmp_path, capsys):
    import factual_recall as fr

    out = tmp_path / "fused.json"
    names = ["adamw", "fused-adagrad", "fused-adam"]
    argv = ["--quick", "--steps", "2", "--value-optimizer", ",".join(names), "--out", str(out)]
    result = fr.main(argv)
    assert [r["name"] for r in result["models"]] == [f"memory {n}" for n in names]
    assert [r["value_optimizer"] for r in result["models"]] == names
    assert result["models"][0]["recall_vs_adamw"] == 1.0
    assert all(0.0 <= r["recall"] <= 1.0 and "recall_vs_adamw" in r for r in result["models"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    refused = tmp_path / "refused.json"
    for bad, message in [
        (["--value-optimizer", "sgd"], "unknown --value-optimizer ['sgd']"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),  # not the default steps
        (["--value-lr", "0"], "--value-lr must be a positive number"),
        (["--adagrad-initial-sum", "-1"], "--adagrad-initial-sum must be a number >= 0"),
        (["--out", str(tmp_path / "plot.png")], "does not end in .json"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            fr.main(["--quick", "--out", str(refused), *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.json", "fused.png"]
