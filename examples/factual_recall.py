"""Factual recall: a memory layer stores more facts than a dense model of the same FLOPs.

A synthetic knowledge base: subjects written as two tokens (from a small alphabet, so no
single embedding can hold a subject's facts), relations, and one object token per
(subject, relation). Each example is the sequence `s1 s2 r` and the model must predict the
object after it. Three models train with the same data, steps and optimizer
(`memcompile.param_groups`, AdamW):

- dense: the example decoder-only transformer (examples/tiny_transformer.py);
- memory: the same model converted by `memcompile.transform` in the placement of Memory
  Layers at Scale (memory in the middle block, replace mode);
- dense-wide: the dense model with its FFNs widened until its FLOPs per token match memory's.

It reports exact-match recall of all stored facts (the greedy prediction is the object),
FLOPs per token and parameter counts, and writes JSON and a PNG plot of recall against
training steps.

`--value-optimizer` compares how the memory values train instead: the memory model once per
listed optimizer, AdamW on every other parameter in all runs. `adamw` puts the values in
AdamW's `memory_values` group; `fused-adagrad` and `fused-adam` update them inside the
backward pass (`memcompile.fuse_value_updates`, row-wise Adagrad or lazy Adam).

    python examples/factual_recall.py            # full run (15-20 min on 2 CPU cores)
    python examples/factual_recall.py --quick    # a few minutes; what the test runs
    python examples/factual_recall.py --quick --value-optimizer adamw,fused-adagrad,fused-adam
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memcompile  # noqa: E402
from memcompile.costs import memory_cost  # noqa: E402
from memcompile.runtime.outputs import atomic_file, refuse_existing  # noqa: E402

from tiny_transformer import TinyConfig, TinyTransformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 3  # s1 s2 r -> object
VALUE_OPTIMIZERS = {"adamw": None, "fused-adagrad": "rowwise_adagrad", "fused-adam": "adam"}


@dataclass(frozen=True)
class Setup:
    subjects: int = 15_000  # distinct two-token subjects
    alphabet: int = 200  # tokens subjects are written with
    relations: int = 4
    objects: int = 512
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    d_hidden: int = 256
    memory_layers: tuple[int, ...] = (1,)  # the middle block
    mem_size: int | str = "64K"
    heads: int = 4
    knn: int = 16
    k_dim: int | None = 32  # half of d_model: the sub-key scores cost half as much
    steps: int = 1500
    batch: int = 1024
    lr: float = 2e-3
    value_lr: float = 1e-2  # AdamW's and fused Adam's value learning rate
    adagrad_value_lr: float = 0.1  # row-wise Adagrad's (its steps shrink as rows are read)
    # Row-wise Adagrad's starting sum. A row's mean squared value gradient here is about
    # 1e-12 a step: 1e-11 damps a row's first steps, which otherwise move it by about lr
    # whatever its gradient.
    adagrad_initial_sum: float = 1e-11
    weight_decay: float = 0.0
    evals: int = 10  # recall measurements along training
    seed: int = 0

    @property
    def facts(self) -> int:
        return self.subjects * self.relations

    @property
    def vocab(self) -> int:
        return self.alphabet + self.relations + self.objects


FULL = Setup()
QUICK = replace(FULL, subjects=5_000, alphabet=100, steps=600, batch=512, evals=6)


def knowledge_base(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (facts, 3), objects (facts,)): token ids `s1 s2 r` and the object token."""
    generator = torch.Generator().manual_seed(setup.seed)
    a = setup.alphabet
    if setup.subjects > a * a:
        raise ValueError(f"{setup.subjects} subjects do not fit in {a}**2 two-token names")
    pairs = torch.randperm(a * a, generator=generator)[: setup.subjects]
    first, second = pairs // a, pairs % a
    relation = torch.arange(setup.relations)
    inputs = torch.stack(
        [
            first.repeat_interleave(setup.relations),
            second.repeat_interleave(setup.relations),
            (a + relation).repeat(setup.subjects),
        ],
        dim=1,
    )
    objects = torch.randint(setup.objects, (setup.facts,), generator=generator)
    return inputs, a + setup.relations + objects


def build(setup: Setup, kind: str, d_hidden: int | None = None) -> nn.Module:
    """The model of `kind` ("dense", "memory", "dense-wide" with its `d_hidden`)."""
    cfg = TinyConfig(
        vocab_size=setup.vocab,
        d_model=setup.d_model,
        n_heads=setup.n_heads,
        n_layers=setup.n_layers,
        d_hidden=d_hidden or setup.d_hidden,
        max_len=SEQ_LEN,
        dropout=0.0,
    )
    torch.manual_seed(setup.seed)
    model = TinyTransformer(cfg)
    if kind == "memory":
        memcompile.transform(
            model,
            layers=list(setup.memory_layers),
            mem_size=setup.mem_size,
            heads=setup.heads,
            knn=setup.knn,
            k_dim=setup.k_dim,
            mode="replace",
            seed=setup.seed,
        )
    return model


def flops_per_token(model: nn.Module, seq_len: int = SEQ_LEN) -> int:
    """Multiply-adds x 2 per token of every projection, attention and memory lookup.

    Attention is counted as computed (the causal mask is applied to a full seq_len x seq_len
    score matrix); embeddings and elementwise work are not counted. A memory layer counts
    as `memcompile inspect` counts it (query, sub-key scores, candidates, bag, gating).
    """
    inside_memory = {
        id(m)
        for layer in model.modules()
        if isinstance(layer, memcompile.MemoryLayer)
        for m in layer.modules()
    }
    total = 0
    for module in model.modules():
        if isinstance(module, memcompile.MemoryLayer):
            block = memcompile.FFNBlock(0, "", "mlp", module.d_in, 0, "", module.d_out)
            total += memory_cost(block, module.config).flops_per_token
        elif isinstance(module, nn.Linear) and id(module) not in inside_memory:
            total += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.MultiheadAttention):
            d = module.embed_dim
            total += 2 * d * 3 * d + 2 * 2 * seq_len * d  # in_proj; scores and weighted sum
    return total


def widen_to_match(setup: Setup, target_flops: int) -> int:
    """The smallest FFN width whose dense model costs at least `target_flops` per token."""
    base = flops_per_token(build(setup, "dense", 1))
    per_unit = flops_per_token(build(setup, "dense", 2)) - base
    return 1 + max(0, math.ceil((target_flops - base) / per_unit))


@torch.no_grad()
def recall(model: nn.Module, inputs: torch.Tensor, objects: torch.Tensor) -> float:
    """Exact-match recall: the share of facts whose greedy next token is the object."""
    model.eval()
    hits = 0
    for start in range(0, len(inputs), 4096):
        logits = model(inputs[start : start + 4096])[:, -1]
        hits += (logits.argmax(-1) == objects[start : start + 4096]).sum().item()
    model.train()
    return hits / len(inputs)


def train(
    setup: Setup, model: nn.Module, inputs, objects, label: str, value_optimizer: str = "adamw"
) -> dict:
    """Train on shuffled epochs of all facts; measure recall `setup.evals` times."""
    fused = VALUE_OPTIMIZERS[value_optimizer]
    if fused is not None:
        adagrad = fused == "rowwise_adagrad"
        memcompile.fuse_value_updates(
            model, fused, setup.adagrad_value_lr if adagrad else setup.value_lr,
            weight_decay=setup.weight_decay,
            initial_accumulator_value=setup.adagrad_initial_sum if adagrad else 0.0,
        )  # fmt: skip
    groups = memcompile.param_groups(model, setup.lr, setup.weight_decay, setup.value_lr)
    optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(setup.seed + 1)  # the same batches for all
    order = torch.empty(0, dtype=torch.long)
    eval_at = {round(setup.steps * (i + 1) / setup.evals) for i in range(setup.evals)}
    curve, start = [], time.perf_counter()
    model.train()
    for step in range(1, setup.steps + 1):
        if len(order) < setup.batch:
            order = torch.cat([order, torch.randperm(len(inputs), generator=generator)])
        picks, order = order[: setup.batch], order[setup.batch :]
        logits = model(inputs[picks])[:, -1]
        loss = F.cross_entropy(logits, objects[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in eval_at:
            curve.append({"step": step, "recall": recall(model, inputs, objects)})
            print(
                f"  {label:<10} step {step:>5}  loss {loss.item():.3f}  "
                f"recall {curve[-1]['recall']:.3f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return {"recall": curve[-1]["recall"], "curve": curve, "seconds": time.perf_counter() - start}


def describe(model: nn.Module) -> dict:
    values = sum(v.numel() for v in memcompile.memory_values(model))
    return {
        "params": memcompile.count_parameters(model),
        "value_params": values,
        "flops_per_token": flops_per_token(model),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in result["models"]:
        steps = [0] + [p["step"] for p in run["curve"]]
        recalls = [0.0] + [p["recall"] for p in run["curve"]]
        label = (
            f"{run['name']} ({run['params'] / 1e6:.2f}M params, "
            f"{run['flops_per_token'] / 1e3:.0f}K FLOPs/token)"
        )
        ax.plot(steps, recalls, marker="o", markersize=3, label=label)
    setup = result["setup"]
    ax.set_title(
        f"Factual recall, {setup['subjects'] * setup['relations']:,} facts"
        + (" (quick)" if result["quick"] else "")
    )
    ax.set_xlabel(f"training steps (batch {setup['batch']})")
    ax.set_ylabel("exact-match recall of all facts")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(setup: Setup, quick: bool = False, value_optimizers: tuple[str, ...] = ()) -> dict:
    """The three models; or, with `value_optimizers`, the memory model once per optimizer."""
    inputs, objects = knowledge_base(setup)
    if value_optimizers:
        models = [(f"memory {v}", build(setup, "memory"), setup.d_hidden, v)
                  for v in value_optimizers]  # fmt: skip
    else:
        memory = build(setup, "memory")
        wide = widen_to_match(setup, flops_per_token(memory))
        models = [
            ("dense", build(setup, "dense"), setup.d_hidden, "adamw"),
            ("memory", memory, setup.d_hidden, "adamw"),
            ("dense-wide", build(setup, "dense-wide", wide), wide, "adamw"),
        ]
    print(
        f"{setup.facts:,} facts ({setup.subjects:,} subjects x {setup.relations} relations, "
        f"{setup.objects} objects), {setup.steps} steps of {setup.batch}: each fact seen "
        f"~{setup.steps * setup.batch / setup.facts:.0f} times",
        flush=True,
    )
    runs = []
    for name, model, d_hidden, value_optimizer in models:
        info = {"name": name, "d_hidden": d_hidden, "value_optimizer": value_optimizer,
                **describe(model)}  # fmt: skip
        print(
            f"{name}: {info['params']:,} params, {info['flops_per_token']:,} FLOPs/token",
            flush=True,
        )
        runs.append({**info, **train(setup, model, inputs, objects, name, value_optimizer)})
    return {
        "benchmark": "factual_recall",
        "quick": quick,
        "date": datetime.date.today().isoformat(),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch thread(s)"
        ),
        "torch": torch.__version__,
        "setup": asdict(setup),
        "models": runs,
    }


def table(result: dict) -> str:
    rows = [
        "| model | FFN hidden | parameters | of which memory values | FLOPs/token "
        "| recall | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        rows.append(
            f"| {r['name']} | {'-' if r['name'].startswith('memory') else r['d_hidden']} "
            f"| {r['params'] / 1e6:.2f}M | {r['value_params'] / 1e6:.2f}M "
            f"| {r['flops_per_token']:,} | {r['recall']:.3f} | {r['seconds']:.0f} s |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (a few minutes)")
    parser.add_argument("--steps", type=int, help="override the number of training steps")
    parser.add_argument(
        "--value-optimizer",
        help="compare value optimizers on the memory model: a comma-separated list of "
        f"{', '.join(VALUE_OPTIMIZERS)} (e.g. adamw,fused-adagrad,fused-adam)",
    )
    parser.add_argument("--value-lr", type=float, help="override every value learning rate")
    parser.add_argument(
        "--adagrad-initial-sum", type=float, help="row-wise Adagrad's starting sum (1e-11)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy 2-core machine one thread is much faster)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON output; the PNG goes beside it (default: "
        "benchmarks/results/factual_recall.json, build/factual_recall_quick.json with --quick; "
        "factual_recall_fused(_quick).json in the same places with --value-optimizer)",
    )
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors (exit 2) before anything is built, trained or written."""
    value_optimizers = args.value_optimizer.split(",") if args.value_optimizer else []
    unknown = [v for v in value_optimizers if v not in VALUE_OPTIMIZERS]
    if unknown:
        parser.error(f"unknown --value-optimizer {unknown}: use {', '.join(VALUE_OPTIMIZERS)}")
    checks = [
        (args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.value_lr is None or math.isfinite(args.value_lr) and args.value_lr > 0,
         f"--value-lr must be a positive number, got {args.value_lr}"),
        (args.adagrad_initial_sum is None
         or math.isfinite(args.adagrad_initial_sum) and args.adagrad_initial_sum >= 0,
         f"--adagrad-initial-sum must be a number >= 0, got {args.adagrad_initial_sum}"),
        (args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
        (len(set(value_optimizers)) == len(value_optimizers),
         f"--value-optimizer names one twice: {args.value_optimizer}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if args.out is not None:
        if args.out.suffix != ".json":
            parser.error(f"--out names the JSON file (its PNG goes beside it): {args.out} does "
                         "not end in .json")  # fmt: skip
        for path in (args.out, args.out.with_suffix(".png")):
            try:
                refuse_existing(path, force=True, file=True)  # rewritten run after run
            except memcompile.MemcompileError as error:
                parser.error(f"--out: {error}")


def _main(args: argparse.Namespace) -> dict:
    setup = QUICK if args.quick else FULL
    if args.steps is not None:
        setup = replace(setup, steps=args.steps, evals=min(setup.evals, args.steps))
    if args.value_lr is not None:
        setup = replace(setup, value_lr=args.value_lr, adagrad_value_lr=args.value_lr)
    if args.adagrad_initial_sum is not None:
        setup = replace(setup, adagrad_initial_sum=args.adagrad_initial_sum)
    value_optimizers = tuple(args.value_optimizer.split(",")) if args.value_optimizer else ()
    stem = "factual_recall_fused" if value_optimizers else "factual_recall"
    out = args.out or (
        ROOT / "build" / f"{stem}_quick.json"
        if args.quick
        else ROOT / "benchmarks" / "results" / f"{stem}.json"
    )
    result = run(setup, quick=args.quick, value_optimizers=value_optimizers)
    by_name = {r["name"]: r for r in result["models"]}
    if value_optimizers:
        adamw = by_name.get("memory adamw")
        for r in result["models"]:
            if adamw is not None:
                r["recall_vs_adamw"] = r["recall"] / max(adamw["recall"], 1e-9)
        return _write(result, out)
    wide = by_name["dense-wide"]["recall"]
    result["memory_vs_equal_flops_dense"] = by_name["memory"]["recall"] / max(wide, 1e-9)
    _write(result, out)
    print(f"memory / equal-FLOPs dense recall: {result['memory_vs_equal_flops_dense']:.2f}x")
    return result


def _write(result: dict, out: Path) -> dict:
    """The JSON and its plot, each written whole (staged and renamed) or not at all."""
    with (
        atomic_file(out, force=True) as staged_json,
        atomic_file(out.with_suffix(".png"), force=True) as staged_png,
    ):
        staged_json.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, staged_png)
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
