"""Fused value updates on a table split colwise by apply_plan (2 gloo ranks) step each rank's
columns exactly as one process steps the whole table: same losses, same values, same dense
parameters. Row-wise Adagrad needs each row's full gradient norm: one all-reduce of per-row
sums over the group."""

from __future__ import annotations

import pytest
import torch
from dist_util import run_ranks
from dist_workers import POOL, batch, build_other, loss_fn, make_optimizer

import memcompile
from memcompile.runtime import MemcompileError, apply_plan
from memcompile.runtime.plan import Plan

STEPS, WORLD = 3, 2
# eps 1e-6 (as make_optimizer): Adam turns rounding noise in a near-zero gradient into a
# full step, so both runs must not divide by a root of ~1e-16.
FUSED = dict(lr=0.05, eps=1e-6)
TOL = dict(rtol=1e-5, atol=1e-5)


def fused_worker(rank, world, plan_json, optimizer):
    model = apply_plan(build_other(), Plan.from_json(plan_json))
    handle = memcompile.fuse_value_updates(model, optimizer, **FUSED)
    opt = make_optimizer(model)  # param_groups leaves the fused table out
    values = model.memcompile_pool.values
    assert all(values is not p for group in opt.param_groups for p in group["params"])
    losses = []
    for step in range(STEPS):
        ids = batch(step, rank)
        loss = loss_fn(model(ids), ids)
        loss.backward()
        assert values.grad is None
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    full = {n: p.full_tensor() for n, p in model.named_parameters() if n != POOL}
    return {"losses": losses, "shard": values.to_local().clone(), "dense": full,
            "step": handle.step}  # fmt: skip


def reference(optimizer):
    model = build_other()
    memcompile.fuse_value_updates(model, optimizer, **FUSED)
    opt = make_optimizer(model)
    losses = []
    for step in range(STEPS):
        parts = [batch(step, r) for r in range(WORLD)]
        ids = torch.cat(parts)
        logits = model(ids).split(len(parts[0]))
        per_rank = [loss_fn(lg, p) for lg, p in zip(logits, parts)]
        sum(per_rank).div(WORLD).backward()
        opt.step()
        opt.zero_grad()
        losses.append([x.item() for x in per_rank])
    return model, losses


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_fused_updates_on_colwise_shards_match_one_process(optimizer):
    plan = memcompile.plan(build_other(), WORLD, strategy="colwise", tokens_per_step=32)
    results = run_ranks(fused_worker, WORLD, plan.to_json(), optimizer)
    model, losses = reference(optimizer)
    table = plan.table(POOL)
    for rank, got in enumerate(results):
        assert got["step"] == STEPS
        torch.testing.assert_close(torch.tensor(got["losses"]),
                                   torch.tensor([x[rank] for x in losses]), **TOL)  # fmt: skip
        c0, c1 = table.shards[rank].cols
        want = model.memcompile_pool.values.detach()[:, c0:c1]
        torch.testing.assert_close(got["shard"], want, **TOL)
        for name, param in model.named_parameters():
            if name != POOL:
                torch.testing.assert_close(got["dense"][name], param.detach(), **TOL, msg=name)


def refused(rank, world, plan_json, message):
    model = apply_plan(build_other(), Plan.from_json(plan_json))
    with pytest.raises(MemcompileError, match=message):
        memcompile.fuse_value_updates(model, "adam", lr=0.01)
    return True


@pytest.mark.parametrize(
    ("strategy", "message"),
    [("rowwise", "colwise over all ranks"), ("replicate", "do not take a replicated table")],
)
def test_fused_updates_refuse_a_rowwise_or_replicated_table(strategy, message):
    plan = memcompile.plan(build_other(), WORLD, strategy=strategy, tokens_per_step=32)
    assert run_ranks(refused, WORLD, plan.to_json(), message) == [True, True]
