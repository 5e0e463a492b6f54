"""Train the tiny example transformer, its FFNs turned into memory layers, on several processes.

    torchrun --nproc-per-node 2 examples/train_distributed.py [--strategy colwise]

Every rank builds the same model from the same seed, converts blocks 1 and 3 (one shared
value table), plans the placement for this world (`memcompile.plan`), lays the model out
with `apply_plan` (value table sharded, dense rest under FSDP2) and trains on its own
batches. NCCL on GPUs, gloo on CPU. Rank 0 prints the loss averaged over the ranks.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memcompile  # noqa: E402
from memcompile.runtime import (  # noqa: E402
    MemcompileError,
    apply_plan,
    init_distributed,
    save_plan,
)
from memcompile.runtime.outputs import refuse_existing  # noqa: E402

from tiny_transformer import TinyConfig, build_model  # noqa: E402


def batch(step: int, rank: int, n: int, seq: int, vocab: int, device) -> torch.Tensor:
    """Sequences that follow x -> (5x + 3) mod vocab from a random start: a rule the model
    can learn in a few steps, so the loss visibly falls."""
    generator = torch.Generator().manual_seed(10_000 * step + rank)
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    ids = [start]
    for _ in range(seq - 1):
        ids.append((ids[-1] * 5 + 3) % vocab)
    return torch.cat(ids, dim=1).to(device)


def build(seq: int, mem_size: str) -> torch.nn.Module:
    """The example transformer, blocks 1 and 3 converted (one shared value table)."""
    cfg = TinyConfig(vocab_size=256, d_model=64, n_layers=4, max_len=seq, dropout=0.0)
    model = build_model(0, cfg)
    return memcompile.transform(model, layers=[1, 3], mem_size=mem_size, knn=8, heads=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--mem-size", default="16K")
    parser.add_argument(
        "--strategy",
        choices=["replicate", "colwise", "rowwise"],
        default=None,
        help="force a placement for the value table (default: the planner's)",
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--value-lr", type=float, default=3e-2)
    parser.add_argument("--plan-out", type=Path, help="also write the plan as JSON here")
    args = parser.parse_args(argv)  # fmt: skip
    _check(parser, args)

    logging.basicConfig(level=logging.WARNING)
    try:
        rank, world = init_distributed()
    except MemcompileError as error:  # run without torchrun: say how to start it
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    train(args, rank, world)
    # train()'s model, optimizer and activations (FSDP2 and DTensor state that holds the
    # process groups) are freed here, while the groups live. Left to interpreter exit, after
    # destroy_process_group, they made a rank abort about one run in ten on a 2-core box
    # ("terminate called without an active exception"); freed first, none in 80 runs.
    gc.collect()
    dist.barrier()  # every rank done with its collectives before any tears gloo down
    dist.destroy_process_group()


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors (exit 2) on every rank before any process group starts."""
    for flag, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1),
                               ("--seq", args.seq, 2)):  # fmt: skip
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    for flag, value in (("--lr", args.lr), ("--value-lr", args.value_lr)):
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a positive number, got {value}")
    try:
        memcompile.MemoryConfig(mem_size=args.mem_size)
        if args.plan_out is not None:
            refuse_existing(args.plan_out, force=True, file=True)  # rewritten run after run
    except MemcompileError as error:
        parser.error(str(error))


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    """Plan, lay out and train the model for `args.steps` steps on this rank."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )

    model = build(args.seq, args.mem_size)
    vocab = model.cfg.vocab_size
    plan = memcompile.plan(
        model,
        gpus_per_node=local,
        nodes=world // local,
        mode="train",
        tokens_per_step=world * args.batch * args.seq,
        strategy=args.strategy,
    )
    if rank == 0:
        print(plan.summary, flush=True)
        if args.plan_out:
            save_plan(plan, args.plan_out, force=True)
    model = apply_plan(model, plan)
    optimizer = torch.optim.AdamW(memcompile.param_groups(model, args.lr, value_lr=args.value_lr))

    for step in range(args.steps):
        ids = batch(step, rank, args.batch, args.seq, vocab, device)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step} loss {mean.item() / world:.4f}", flush=True)


if __name__ == "__main__":
    main()
