"""What each rank of the distributed tests runs (spawned by dist_util.run_ranks), and the
model, batches, plans and collective counter they share with the single-process reference."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import memcompile
from memcompile.passes.partition import PartitionConfig, find_tables, plan_model
from memcompile.passes.plan_costs import option
from memcompile.runtime import (
    CollectiveError,
    MemcompileError,
    PlanMismatchError,
    apply_plan,
    full_state_dict,
    load_distributed,
    save_distributed,
)
from memcompile.runtime.plan import Mesh, Plan
from memcompile.runtime.sharded_bag import ALL_GATHER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_transformer import TinyConfig, build_model  # noqa: E402

CFG = TinyConfig(
    vocab_size=64, d_model=32, n_heads=2, n_layers=4, d_hidden=64, max_len=16, dropout=0.0
)
SMALL = dict(mem_size="4K", knn=4, heads=2)
BATCH, SEQ = 2, 8
POOL, OWN, OWN3 = "memcompile_pool.values", "blocks.1.mlp.values", "blocks.3.mlp.values"
OPS = (ALL_GATHER, "all_to_all_single", "all_reduce")


def build(lazy: bool = False) -> torch.nn.Module:
    """4 blocks: 0 and 2 read the shared pool (two readers), 1 and 3 have their own table.
    `lazy`: value tables on the meta device (apply_plan builds each rank's shard only)."""
    model = build_model(0, CFG)
    memcompile.transform(model, layers=[0, 2], lazy_init=lazy, **SMALL)
    memcompile.transform(model, layers=[1, 3], share_values=False, lazy_init=lazy, **SMALL)
    return model


def build_other() -> torch.nn.Module:
    """The same base model with only the pool: a model a plan of `build()` does not fit."""
    model = build_model(0, CFG)
    memcompile.transform(model, layers=[0, 2], **SMALL)
    return model


def batch(step: int, rank: int, n: int = BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, CFG.vocab_size, (n, SEQ), generator=generator)


def loss_fn(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps 1e-6, not 1e-8: the attention key bias has a zero gradient (softmax ignores it),
    # so both runs see rounding noise there, which Adam would blow up to +-lr steps.
    groups = memcompile.param_groups(model, lr=1e-3, value_lr=1e-2)
    return torch.optim.AdamW(groups, eps=1e-6)


def make_plan(model, world: int, gpus_per_node: int, choice: dict, mode: str = "train") -> Plan:
    """The planner's plan, with each table forced to `choice[name] = (strategy, group)`."""
    config = PartitionConfig(
        mesh=Mesh(gpus_per_node, world // gpus_per_node),
        mode=mode,
        tokens_per_step=world * BATCH * SEQ,
    )
    plan = plan_model(model, config)
    tables = {t.name: t for t in find_tables(model)}
    forced = []
    for table in plan.tables:
        strategy, group = choice[table.name]
        o = option(
            tables[table.name], config.mesh, strategy, group, mode,
            config.tokens_per_rank, config.bandwidth, config.optimizer_bytes_per_param,
        )  # fmt: skip
        forced.append(
            replace(table, strategy=strategy, group_size=group, replicas=o.replicas,
                    shards=o.shards, collectives=o.collectives)
        )  # fmt: skip
    return replace(plan, tables=tuple(forced))


def sent_bytes(op: str, args, kwargs) -> int:
    """Bytes this rank sends: all_gather (G-1) x input; all_to_all input less its own
    chunk; all_reduce 2 (G-1)/G x the tensor (ring)."""
    group = kwargs.get("group")
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if op == ALL_GATHER:
        return (size - 1) * args[1].nbytes
    if op == "all_reduce":
        return 2 * (size - 1) * args[0].nbytes // size
    tensor = args[1]
    splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
    if not splits:
        return tensor.nbytes - tensor.nbytes // size
    row = tensor.nbytes // tensor.shape[0] if tensor.shape[0] else 0
    return tensor.nbytes - splits[me] * row


class Counter:
    """Wraps torch.distributed's collectives: every call is counted; calls from memcompile
    while `phase` is set are recorded as (phase, table, op, bytes sent)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, str, int]] = []
        self.calls = 0
        self.phase: str | None = None
        for op in OPS:
            setattr(dist, op, self._wrap(op, getattr(dist, op)))

    def _wrap(self, op, original):
        def wrapper(*args, **kwargs):
            self.calls += 1
            frame = sys._getframe(1)
            if self.phase and frame.f_globals.get("__name__", "").startswith("memcompile."):
                # runtime.sharded_bag.run_collective's label: "table <name>" (a sharded bag
                # or a table's gradient hook) or "parameter <name>" (the dense part)
                kind, _, table = frame.f_locals["label"].partition(" ")
                table = table if kind == "table" else "dense"
                # under the plan's name for the op, whichever of torch's two names ran
                planned = "all_gather_into_tensor" if op == ALL_GATHER else op
                self.records.append((self.phase, table, planned, sent_bytes(op, args, kwargs)))
            return original(*args, **kwargs)

        return wrapper


def snapshot(model, grads: bool) -> dict[str, torch.Tensor]:
    """Every parameter (or gradient): value tables as the local shard, the rest whole."""
    out = {}
    tables = {t.name for t in model.memcompile_plan.tables}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local() if name in tables else t.full_tensor()
        out[name] = t.detach().clone()
    return out


def log_indices(model, plan, log: list) -> None:
    """Record (table, indices) of every reader call, in call order."""
    for table in plan.tables:
        owner = model.get_submodule(table.name.rpartition(".")[0])
        impl = owner.bag_impl

        def recorder(values, indices, weights, impl=impl, name=table.name):
            log.append((name, indices.clone()))
            return impl(values, indices, weights)

        owner.bag_impl = recorder


def train_worker(
    rank, world, plan_json, steps, ckpt=None, reload=False, uneven=False, lazy=False,
    accumulate=False,
):  # fmt: skip
    """Train `steps` AdamW steps under the plan; everything the test compares. With
    `accumulate`, each step's gradient is accumulated over two half batches."""
    plan = Plan.from_json(plan_json)
    counter = Counter()
    model = apply_plan(build(lazy), plan)
    indices: list = []
    log_indices(model, plan, indices)
    opt = make_optimizer(model)
    out = {"steps": []}
    for step in range(steps):
        ids = batch(step, rank)
        if accumulate:  # (loss / 2) of each half: the whole batch's gradient
            for half in ids.chunk(2):
                (loss_fn(model(half), half) / 2).backward()
            with torch.no_grad():
                logits = model(ids)
            loss = loss_fn(logits, ids)
        else:
            counter.phase = "forward" if step == 0 else None
            logits = model(ids)
            loss = loss_fn(logits, ids)
            counter.phase = "backward" if step == 0 else None
            loss.backward()
            counter.phase = None
        grads = snapshot(model, grads=True)
        out["steps"].append({"logits": logits.detach(), "loss": loss.item(), "grads": grads})
        opt.step()
        opt.zero_grad()
    out["records"] = counter.records
    out["indices"] = indices[: len(indices) // steps] if steps else []
    out["params"] = snapshot(model, grads=False)
    if uneven:  # ranks with different token counts: forward and gradients
        ids = batch(99, rank, n=1 + rank % 2)
        logits = model(ids)
        loss_fn(logits, ids).backward()
        out["uneven"] = {"logits": logits.detach(), "grads": snapshot(model, grads=True)}
        opt.zero_grad()
    if ckpt is not None:
        save_distributed(ckpt, model, opt)
    if reload:
        again = apply_plan(build(lazy), plan)
        opt2 = make_optimizer(again)
        load_distributed(ckpt, again, opt2)
        ids = batch(50, rank)
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
        for m, o in ((model, opt), (again, opt2)):  # one more step: the optimizer state too
            loss_fn(m(batch(steps, rank)), batch(steps, rank)).backward()
            o.step()
        a, b = snapshot(model, grads=False), snapshot(again, grads=False)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
        out["reloaded"] = True
    return out


def load_worker(rank, world, plan_json, ckpt, steps_done):
    """Load a checkpoint saved by another world size; its parameters, then one more step."""
    plan = Plan.from_json(plan_json)
    model = apply_plan(build(), plan)
    opt = make_optimizer(model)
    load_distributed(ckpt, model, opt)
    out = {"params": snapshot(model, grads=False)}
    ids = batch(steps_done, rank)
    loss_fn(model(ids), ids).backward()
    opt.step()
    out["stepped"] = snapshot(model, grads=False)
    weights_only = apply_plan(build(), plan)  # a checkpoint without the optimizer state
    load_distributed(ckpt, weights_only)
    out["weights_only"] = snapshot(weights_only, grads=False)
    out["full"] = full_state_dict(model)
    return out


def refuse_worker(rank, world, plans: dict, good_json):
    """apply_plan on bad plans, and twice on one model: the message of each refusal, and
    no collective issued."""
    counter = Counter()
    out = {}
    for name, plan_json in plans.items():
        try:
            apply_plan(build(), Plan.from_json(plan_json))
            out[name] = None
        except PlanMismatchError as error:
            out[name] = str(error)
    out["collectives"] = counter.calls
    model = apply_plan(build(), Plan.from_json(good_json))
    try:
        apply_plan(model, Plan.from_json(good_json))
        out["twice"] = None
    except MemcompileError as error:
        out["twice"] = str(error)
    return out


def misuse_worker(rank, world, plan_json, out_dir):
    """A backward pass under an inference plan, and memcompile.save of a planned model:
    each refusal's message, or None."""
    model = apply_plan(build(), Plan.from_json(plan_json))
    ids = batch(0, rank)
    with torch.no_grad():
        model(ids)  # inference itself runs
    messages = {}
    try:
        loss_fn(model(ids), ids).backward()
        messages["backward"] = None
    except MemcompileError as error:
        messages["backward"] = str(error)
    try:
        memcompile.save(model, f"{out_dir}/rank{rank}")
        messages["save"] = None
    except MemcompileError as error:
        messages["save"] = str(error)
    return messages


def failing_worker(rank, world, plan_json, how: str, hang_s: float = 0.0):
    """Rank 1 raises, exits, or hangs for `hang_s` before the forward; rank 0 reports what
    it got and when."""
    model = apply_plan(build(), Plan.from_json(plan_json))
    if rank == 1:
        if how == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        if how == "hang":
            time.sleep(hang_s)
        os._exit(1)
    start = time.monotonic()
    try:
        with torch.no_grad():
            model(batch(0, rank))
    except CollectiveError as error:
        return {"error": str(error), "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def bag_problem(rank: int, tokens: int, rows: int = 37, v_dim: int = 6, picks: int = 5):
    """One rank's lookup (indices, weights, output gradient) and the whole table, seeded."""
    g = torch.Generator().manual_seed(100 + rank)
    full = torch.randn(rows, v_dim, generator=torch.Generator().manual_seed(7))
    indices = torch.randint(0, rows, (tokens, picks), generator=g)
    weights = torch.rand(tokens, picks, generator=g)
    grad_out = torch.randn(tokens, v_dim, generator=g)
    return full, indices, weights, grad_out


def sharded_bag_worker(rank, world, strategy: str, tokens: list[int], weights_dtype: str):
    """A ShardedBag lookup on this rank's tokens (0 allowed), forward and backward."""
    from memcompile.runtime.sharded_bag import ShardedBag, ShardSpec

    full, indices, weights, grad_out = bag_problem(rank, tokens[rank])
    spec = ShardSpec("t", strategy, None, world, rank, *full.shape)
    (r0, r1), (c0, c1) = spec.row_ranges[rank], spec.col_ranges[rank]
    shard = full[r0:r1, c0:c1].clone().requires_grad_()
    weights = weights.to(getattr(torch, weights_dtype)).requires_grad_()
    out = ShardedBag(spec)(shard, indices, weights)
    out.backward(grad_out)
    return {"out": out.detach(), "shard_grad": shard.grad, "weights_grad": weights.grad}
