"""Partitioned execution (`apply_plan`) on 2 and 4 gloo processes against one process.

Each run trains the 4-block example model (blocks 0 and 2 read a shared pool, 1 and 3 own
their tables) under a plan from the partition pass with the strategies forced per table,
and the test compares, per rank: the forward outputs, every gradient (value shards against
the matching slice of the single-process gradient, FSDP parameters whole), the parameters
after three AdamW steps, and the bytes each memory collective sent (counted by wrappers
around torch.distributed) against the plan's prediction.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_util import RankFailed, free_port, run_ranks
from dist_workers import (
    BATCH,
    OWN,
    OWN3,
    POOL,
    batch,
    build,
    build_other,
    failing_worker,
    load_worker,
    loss_fn,
    make_optimizer,
    make_plan,
    misuse_worker,
    refuse_worker,
    train_worker,
)

from memcompile.runtime.plan import chunk_ranges, load_plan, model_fingerprint
from memcompile.runtime.sharded_bag import ALL_GATHER

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TOL = dict(rtol=1e-5, atol=1e-5)


def reference(world: int, steps: int) -> dict:
    """The same training on one process: rank r's batch is the r-th slice of the batch."""
    model = build()
    opt = make_optimizer(model)
    out = {"steps": []}
    for step in range(steps):
        ids = torch.cat([batch(step, r) for r in range(world)])
        logits = model(ids)
        loss_fn(logits, ids).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out["steps"].append({"logits": logits.detach().split(BATCH), "grads": grads})
        opt.step()
        opt.zero_grad()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["opt_state"] = opt.state_dict()
    return out


def reference_uneven(world: int, params: dict) -> dict:
    """Ranks with 1 or 2 sequences: the gradient of the mean of the ranks' mean losses."""
    model = build()
    model.load_state_dict(params)
    outputs, total = [], 0.0
    for r in range(world):
        ids = batch(99, r, n=1 + r % 2)
        logits = model(ids)
        outputs.append(logits.detach())
        total = total + loss_fn(logits, ids) / world
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": outputs, "grads": grads}


def span(plan, name: str, rank: int) -> tuple[slice, slice]:
    shard = next(s for s in plan.table(name).shards if s.rank == rank)
    return slice(*shard.rows), slice(*shard.cols)


def assert_same(plan, rank: int, got: dict, want: dict, what: str) -> None:
    """Distributed tensors of rank `rank` against the single-process ones."""
    assert set(got) == set(want), what
    tables = {t.name for t in plan.tables}
    for name, expected in want.items():
        if name in tables:
            expected = expected[span(plan, name, rank)]
        torch.testing.assert_close(
            got[name], expected, **TOL, msg=lambda m, name=name: f"{what} {name} rank {rank}: {m}"
        )


def owned(indices: torch.Tensor, rows: int, group: int, index: int) -> int:
    """How many picks of `indices` fall in the rows rank `index` of a group of `group` holds."""
    lo, hi = chunk_ranges(rows, group)[index]
    return int(((indices >= lo) & (indices < hi)).sum())


def expected_bytes(plan, results, rank: int, table, phase: str) -> list[tuple[str, int]]:
    """The (op, bytes) sequence rank `rank` sends for `table` in `phase`: the plan's figure
    for fixed-size collectives, and for routed pairs a count from the indices themselves."""
    g = table.group_size
    me, first = rank % g, rank - rank % g
    calls = [i for name, i in results[rank]["indices"] if name == table.name]
    if phase == "backward":
        calls = calls[::-1]  # the readers' backwards run in reverse order
    out = []
    for k, indices in enumerate(calls):
        for c in table.collectives:
            if c.phase != phase:
                continue
            if c.name == "routed_pairs":  # 12 bytes for each pick another rank holds
                sent = 12 * (indices.numel() - owned(indices, table.rows, g, me))
            elif c.name == "grad_weights" and c.data_dependent:  # 4 bytes per pair received
                peers = [first + j for j in range(g) if j != me]
                peer_calls = [
                    [i for n, i in results[p]["indices"] if n == table.name] for p in peers
                ]
                if phase == "backward":
                    peer_calls = [c_[::-1] for c_ in peer_calls]
                sent = 4 * sum(owned(pc[k], table.rows, g, me) for pc in peer_calls)
            else:
                assert not c.data_dependent, c.name
                sent = c.bytes_by_rank[rank]
            out.append((c.op, sent))
    if phase == "backward":  # hooks: once per step
        out += [(c.op, c.bytes_by_rank[rank]) for c in table.collectives if c.phase == "step"]
    return out


def check_run(plan, results, ref, steps: int) -> None:
    world = plan.mesh.world_size
    for rank, got in enumerate(results):
        for step in range(steps):
            step_got, step_want = got["steps"][step], ref["steps"][step]
            torch.testing.assert_close(
                step_got["logits"], step_want["logits"][rank], **TOL, msg=f"logits step {step}"
            )
            assert_same(plan, rank, step_got["grads"], step_want["grads"], f"grad step {step}")
        assert_same(plan, rank, got["params"], ref["params"], f"after {steps} AdamW steps")
        # Bytes sent per memory collective, in order, against the plan.
        for table in plan.tables:
            for phase in ("forward", "backward"):
                records = got["records"]
                measured = [(o, n) for p, t, o, n in records if (p, t) == (phase, table.name)]
                want = expected_bytes(plan, results, rank, table, phase)
                assert measured == want, f"{table.name} {phase} rank {rank} of {world}"
    recorded = {name for r in results for _, name, _, _ in r["records"]} - {"dense"}
    assert recorded == {t.name for t in plan.tables if t.strategy != "replicate" or world > 1}
    if plan.dense.strategy == "replicate":  # DDP-like: each gradient all_reduced once
        dense = {n: p for n, p in ref["params"].items() if n not in {t.name for t in plan.tables}}
        for got in results:
            sent = [
                n for _, name, op, n in got["records"] if name == "dense" and op == "all_reduce"
            ]
            assert sorted(sent) == sorted(
                2 * (world - 1) * p.nbytes // world for p in dense.values()
            )


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """4 ranks, one node: the pool colwise, block 1 rowwise, block 3 replicated; saved."""
    model = build()
    choice = {POOL: ("colwise", 4), OWN: ("rowwise", 4), OWN3: ("replicate", 1)}
    plan = make_plan(model, 4, 4, choice)
    ckpt = tmp_path_factory.mktemp("dcp") / "four"
    results = run_ranks(train_worker, 4, plan.to_json(), STEPS, str(ckpt), False, True)
    return plan, results, ckpt


def test_four_ranks_colwise_rowwise_replicate_match_one_process(four_ranks):
    plan, results, _ = four_ranks
    ref = reference(4, STEPS)
    check_run(plan, results, ref, STEPS)
    # Ranks with different token counts (padding in colwise): outputs and gradients.
    uneven = reference_uneven(4, ref["params"])
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["uneven"]["logits"], uneven["logits"][rank], **TOL)
        assert_same(plan, rank, got["uneven"]["grads"], uneven["grads"], "uneven grad")


def test_two_ranks_rowwise_colwise_match_and_reload(tmp_path):
    model = build()
    choice = {POOL: ("rowwise", 2), OWN: ("colwise", 2), OWN3: ("colwise", 2)}
    plan = make_plan(model, 2, 2, choice)
    ckpt = str(tmp_path / "c")
    # Lazy tables: each rank builds its own shard from the init recipe, equal to the slice
    # of the table the one-process reference builds whole.
    results = run_ranks(train_worker, 2, plan.to_json(), STEPS, ckpt, True, False, True)
    check_run(plan, results, reference(2, STEPS), STEPS)
    assert all(r["reloaded"] for r in results)  # checked bit-exact inside the ranks


def test_replica_groups_two_nodes_of_two(tmp_path):
    """Shard groups of 2 (a node) replicated over 2 nodes: value gradients all_reduced
    over the replica group; a replicated table over the world; the dense part replicated
    too (gradients all_reduced, like DDP) instead of FSDP."""
    model = build()
    choice = {POOL: ("colwise", 2), OWN: ("rowwise", 2), OWN3: ("replicate", 1)}
    plan = make_plan(model, 4, 2, choice)
    plan = replace(plan, dense=replace(plan.dense, strategy="replicate", units=("",)))
    assert plan.table(POOL).replicas == 2
    results = run_ranks(train_worker, 4, plan.to_json(), 2)
    check_run(plan, results, reference(4, 2), 2)


def test_gradients_accumulated_over_replica_groups_match_one_process():
    # A sum over replicas counted the first micro-batch, already reduced, once per replica.
    model = build()
    choice = {POOL: ("colwise", 2), OWN: ("rowwise", 2), OWN3: ("replicate", 1)}
    plan = make_plan(model, 4, 2, choice)
    plan = replace(plan, dense=replace(plan.dense, strategy="replicate", units=("",)))
    assert plan.table(POOL).replicas == plan.table(OWN).replicas == 2
    results = run_ranks(train_worker, 4, plan.to_json(), 2, None, False, False, False, True)
    ref = reference(4, 2)
    for rank, got in enumerate(results):
        for step in range(2):
            grads = got["steps"][step]["grads"]
            assert_same(plan, rank, grads, ref["steps"][step]["grads"], f"grad step {step}")
        assert_same(plan, rank, got["params"], ref["params"], "after 2 accumulated steps")


def test_training_under_an_inference_plan_and_saving_a_planned_model_are_refused(tmp_path):
    model = build()
    choice = {POOL: ("colwise", 2), OWN: ("rowwise", 2), OWN3: ("replicate", 1)}
    plan = make_plan(model, 2, 2, choice, mode="infer")
    for messages in run_ranks(misuse_worker, 2, plan.to_json(), str(tmp_path)):
        assert "runs an inference plan" in messages["backward"]
        assert "mode='train'" in messages["backward"]
        assert "save_distributed" in messages["save"]
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_of_four_ranks_loads_into_two(four_ranks):
    _, _, ckpt = four_ranks
    model = build()
    choice = {POOL: ("rowwise", 2), OWN: ("colwise", 2), OWN3: ("replicate", 1)}
    plan = make_plan(model, 2, 2, choice)
    results = run_ranks(load_worker, 2, plan.to_json(), str(ckpt), STEPS)
    ref4 = reference(4, STEPS)
    # The next step runs on 2 ranks: the reference continues from the 4-rank state.
    model = build()
    opt = make_optimizer(model)
    model.load_state_dict(ref4["params"])
    opt.load_state_dict(ref4["opt_state"])
    ids = torch.cat([batch(STEPS, r) for r in range(2)])
    loss_fn(model(ids), ids).backward()
    opt.step()
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    for rank, got in enumerate(results):
        assert_same(plan, rank, got["params"], ref4["params"], "loaded")
        assert_same(plan, rank, got["stepped"], stepped, "loaded, then one step")
        assert_same(plan, rank, got["weights_only"], ref4["params"], "loaded without optimizer")
    # The whole state dict, gathered on rank 0 (as for memcompile.save), after that step.
    full = results[0]["full"]
    assert set(full) == set(stepped) and results[1]["full"] == {}
    for name, tensor in stepped.items():
        torch.testing.assert_close(full[name], tensor, **TOL, msg=name)


def test_plans_for_another_world_or_model_are_refused_before_any_collective():
    model = build()
    good = make_plan(model, 2, 2, {POOL: ("colwise", 2), OWN: ("rowwise", 2), OWN3: ("colwise", 2)})
    four = make_plan(model, 4, 4, {POOL: ("colwise", 4), OWN: ("rowwise", 4), OWN3: ("colwise", 4)})
    wrong_model = replace(good, model_fingerprint=model_fingerprint(build_other()))
    shifted = replace(good.table(POOL).shards[1], cols=(15, 32))
    bad_shards = replace(
        good,
        tables=tuple(
            replace(t, shards=(t.shards[0], shifted)) if t.name == POOL else t for t in good.tables
        ),
    )
    plans = {"four": four.to_json(), "model": wrong_model.to_json(), "shards": bad_shards.to_json()}
    results = run_ranks(refuse_worker, 2, plans, good.to_json())
    for got in results:
        assert re.search(r"plan is for 4 ranks .* runs 2", got["four"]), got["four"]
        assert "made for another model" in got["model"], got["model"]
        assert "cols (15, 32)" in got["shards"] and "torch.chunk" in got["shards"]
        assert all("\n" not in got[k] for k in plans)
        assert got["collectives"] == 0
        assert "already has a bag_impl (ShardedBag)" in got["twice"]


@pytest.mark.parametrize("how", ["raise", "exit", "hang"])
def test_a_failing_rank_makes_the_others_fail_fast(how):
    """A peer that raised or exited is noticed at once (its sockets close); one that hangs,
    after the process group's timeout (5 s here). The error is one line naming the table,
    the collective and the rank."""
    model = build()
    choice = {POOL: ("colwise", 2), OWN: ("rowwise", 2), OWN3: ("colwise", 2)}
    plan = make_plan(model, 2, 2, choice, mode="infer")  # dense replicated: no FSDP
    results = run_ranks(
        failing_worker, 2, plan.to_json(), how, 8.0,
        timeout_s=5, deadline_s=150, allow_failures=True,
    )  # fmt: skip
    survivor, failed = results
    assert isinstance(failed, RankFailed)
    if how == "raise":
        assert "rank 1 fails on purpose" in failed.text
    message = survivor["error"]
    assert message is not None and "\n" not in message
    assert message.startswith(f"table {POOL}: {ALL_GATHER} of token counts failed")
    assert "on rank 0" in message
    if how == "hang":
        assert "Timed out" in message and 4 < survivor["elapsed"] < 20
    else:
        assert survivor["elapsed"] < 5


@pytest.mark.parametrize(
    "strategy, tokens, weights_dtype",
    [("rowwise", [4, 0], "float32"), ("rowwise", [0, 0], "float32"),
     ("colwise", [3, 0], "float32"), ("rowwise", [3, 5], "bfloat16")],
)  # fmt: skip
def test_a_sharded_lookup_equals_the_whole_tables(strategy, tokens, weights_dtype):
    """Against one process's bag over the whole table: a rank with no tokens (an idle
    server rank, a last uneven batch) and 16-bit weights included."""
    from dist_workers import bag_problem, sharded_bag_worker

    from memcompile.kernels import reference

    results = run_ranks(sharded_bag_worker, 2, strategy, tokens, weights_dtype)
    full = bag_problem(0, 0)[0].double().requires_grad_()
    for rank, got in enumerate(results):
        _, indices, weights, grad_out = bag_problem(rank, tokens[rank])
        weights = weights.to(getattr(torch, weights_dtype)).double().requires_grad_()
        out = reference.bag(full, indices, weights)
        out.backward(grad_out.double())
        torch.testing.assert_close(got["out"].double(), out.detach(), rtol=1e-5, atol=1e-6)
        want = weights.grad.to(getattr(torch, weights_dtype)).double()
        torch.testing.assert_close(got["weights_grad"].double(), want, rtol=1e-2, atol=1e-5)
    split = 0 if strategy == "rowwise" else 1  # the shards, joined, are the whole table
    grads = torch.cat([r["shard_grad"] for r in results], dim=split).double()
    torch.testing.assert_close(grads, full.grad, rtol=1e-5, atol=1e-6)


def test_example_trains_under_torchrun(tmp_path):
    """examples/train_distributed.py on 2 processes: the loss falls, and each step's loss
    is the one-process loss of the same training on both ranks' batches."""
    from train_distributed import batch as example_batch
    from train_distributed import build as example_build

    import memcompile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    steps = 6
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), str(ROOT / "examples" / "train_distributed.py"),
        "--steps", str(steps), "--strategy", "colwise", "--plan-out", str(tmp_path / "plan.json"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", done.stdout)]
    assert len(losses) == steps, done.stdout
    assert losses[-1] < losses[0] - 0.3, losses
    assert load_plan(tmp_path / "plan.json").tables[0].strategy == "colwise"

    model = example_build(32, "16K")
    optimizer = torch.optim.AdamW(memcompile.param_groups(model, 3e-3, value_lr=3e-2))
    for step, printed in enumerate(losses):
        ids = torch.cat([example_batch(step, r, 8, 32, 256, "cpu") for r in range(2)])
        logits = model(ids)
        loss = loss_fn_vocab(logits, ids, 256)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert abs(loss.item() - printed) < 2e-4, (step, loss.item(), printed)


@pytest.mark.parametrize(
    "args, says",
    [(["--seq", "1"], "--seq must be at least 2"), (["--lr", "nan"], "--lr must be a positive"),
     (["--mem-size", "63K"], "not a perfect square"), (["--batch", "0"], "--batch must be")],
)  # fmt: skip
def test_example_refuses_bad_arguments_before_any_process_group(args, says, capsys):
    from train_distributed import main as example_main

    with pytest.raises(SystemExit) as stopped:
        example_main(args)
    assert stopped.value.code == 2 and says in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def loss_fn_vocab(logits, ids, vocab):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)
    )
