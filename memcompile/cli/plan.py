"""`memcompile plan`: place a converted checkpoint's memory tables and dense part on GPUs."""

from __future__ import annotations

import click

from .common import echo_json, fail_cleanly, force_option, json_option, quiet_option, steps_for

EPILOG_PLAN = """\b
Examples:
  memcompile plan ./ckpt --gpus 8 -o plan.json                       # one node of 8
  memcompile plan ./ckpt --gpus 8 --nodes 2 --tokens-per-step 65536 -o plan.json
  memcompile plan ./ckpt --gpus 1 --mode infer --gpu-mem 24GB -o serve.json
  memcompile plan ./ckpt --gpus 4 --strategy rowwise --json -o plan.json
Run it under torchrun, in every rank (see examples/train_distributed.py):
  model = memcompile.load("./ckpt", materialize=False)   # tables: each rank builds its shard
  model = memcompile.runtime.apply_plan(model, memcompile.runtime.load_plan("plan.json"))
"""


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _print_plan(plan) -> None:
    click.echo(plan.summary)
    click.echo("")
    click.echo(f"{'table':<34} {'rows x v_dim':>18} {'strategy':<16} {'shard':>11}  why")
    for t in plan.tables:
        where = t.strategy if t.strategy in ("replicate", "host") else (
            f"{t.strategy}/{t.group_size}" + (f" x{t.replicas}" if t.replicas > 1 else "")
        )  # fmt: skip
        per_rank = max(s.bytes for s in t.shards)
        shape = f"{t.rows} x {t.v_dim}"
        click.echo(f"{t.name:<34} {shape:>18} {where:<16} {_gb(per_rank):>11}  {t.reason}")
    click.echo("")
    click.echo(f"dense part: {plan.dense.strategy} ({plan.dense.parameters} parameters, "
               f"{len(plan.dense.units)} unit(s))")  # fmt: skip
    click.echo("")
    click.echo(f"{'rank':>4} {'weights':>11} {'grads':>11} {'optimizer':>11} "
               f"{'activations':>11} {'total':>11} {'comm/step':>11}")  # fmt: skip
    collectives = [c for t in plan.tables for c in t.collectives] + list(plan.dense.collectives)
    for r in plan.ranks:
        sent = sum(c.bytes_per_step(r.rank) for c in collectives)
        click.echo(
            f"{r.rank:>4} {_gb(r.weights):>11} {_gb(r.gradients):>11} "
            f"{_gb(r.optimizer_state):>11} {_gb(r.activations):>11} {_gb(r.total):>11} "
            f"{_gb(sent):>11}"
        )
    click.echo("")
    parts = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in plan.time_breakdown_s.items())
    click.echo(f"estimated step: {plan.step_time_s * 1e3:.2f} ms ({parts})")


@click.command("plan", epilog=EPILOG_PLAN)
@click.argument("model_path", metavar="CKPT", type=click.Path())
@click.option("--gpus", type=int, required=True, help="GPUs per node")
@click.option("--nodes", type=int, default=1, show_default=True, help="nodes")
@click.option(
    "--mode", type=click.Choice(["train", "infer"]), default="train", show_default=True,
    help="training (FSDP2 dense part, gradients, AdamW state) or inference",
)  # fmt: skip
@click.option("--gpu-mem", default="80GB", show_default=True, help="memory per GPU (GB or GiB)")
@click.option(
    "--tokens-per-step", type=int, default=16384, show_default=True,
    help="tokens per step over all GPUs together",
)  # fmt: skip
@click.option(
    "--strategy", type=click.Choice(["replicate", "colwise", "rowwise", "host"]),
    help="use this strategy for every table instead of the cheapest that fits",
)  # fmt: skip
@click.option("--hbm", type=float, help="HBM bytes/s (default 3.0e12)")
@click.option("--intra-node", type=float, help="GPU-GPU bytes/s inside a node (default 450e9)")
@click.option("--inter-node", type=float, help="GPU-GPU bytes/s between nodes (default 50e9)")
@click.option("--host-link", type=float, help="GPU-host bytes/s (default 55e9)")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="plan JSON")
@click.option("--trust-pickle", is_flag=True, help="allow a checkpoint whose source is a pickle")
@force_option
@json_option("print the plan as JSON instead of a table")
@quiet_option
@fail_cleanly
def plan(
    model_path, gpus, nodes, mode, gpu_mem, tokens_per_step, strategy, hbm, intra_node,
    inter_node, host_link, output, trust_pickle, force, as_json, quiet,
):  # fmt: skip
    """Write the execution plan of a converted checkpoint CKPT for GPUS x NODES GPUs.

    For every memory table: replicate, colwise, rowwise or (inference) host, chosen as the
    fastest that fits in GPU memory next to the dense part; bytes per rank, collectives per
    step and an estimated step time from the bandwidth model.
    """
    from pathlib import Path

    from ..checkpoint import is_checkpoint, load
    from ..planning import plan as make_plan
    from ..runtime import BandwidthModel, MemcompileError, save_plan
    from ..runtime.outputs import refuse_existing

    refuse_existing(output, force, inputs=[model_path])
    if gpu_mem.strip().replace(".", "", 1).isdigit():  # a bare number would count bytes
        raise MemcompileError(
            f"--gpu-mem {gpu_mem} needs a unit: e.g. {gpu_mem.strip()}GB (10**9 bytes) or "
            f"{gpu_mem.strip()}GiB (2**30)"
        )
    if Path(model_path).suffix == ".pt2":
        raise MemcompileError(
            f"{model_path} is a torch.export program: `memcompile plan` reads a memcompile "
            "checkpoint directory, which `memcompile convert -o DIR` writes from a module (a "
            "Hugging Face directory, a .pt or safetensors file); a .pt2 converts only to .pt2"
        )
    if not is_checkpoint(Path(model_path)):
        raise MemcompileError(
            f"{model_path} is not a memcompile checkpoint (no memcompile.json): convert the "
            "model first with `memcompile convert`"
        )
    overrides = {"hbm": hbm, "intra_node": intra_node, "inter_node": inter_node,
                 "host_link": host_link}  # fmt: skip
    bandwidth = BandwidthModel(**{k: v for k, v in overrides.items() if v is not None})
    steps = steps_for(quiet, as_json)
    with steps(f"loading {model_path}"):
        # Shapes are all the planner reads: lazily stored tables stay unbuilt.
        model = load(model_path, trust_pickle=trust_pickle, materialize=False)
    with steps("planning"):
        result = make_plan(
            model, gpus, nodes, mode=mode, gpu_memory=gpu_mem, tokens_per_step=tokens_per_step,
            bandwidth=bandwidth, strategy=strategy,
        )  # fmt: skip
    save_plan(result, output, force=force)
    if as_json:
        echo_json(result.to_json())
    else:
        _print_plan(result)
        click.echo(f"\nwrote {output}")
