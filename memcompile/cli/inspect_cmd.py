"""`memcompile inspect`: list a model's FFN blocks, and what converting them would cost."""

from __future__ import annotations

import click

from ..runtime import MemcompileError
from ..runtime.config import human_bytes
from .common import (
    echo_json,
    fail_cleanly,
    json_option,
    load,
    memory_config,
    memory_options,
    model_options,
    quiet_option,
    steps_for,
)

EPILOG_INSPECT = """\b
Examples:
  memcompile inspect ./my-hf-model
  memcompile inspect ./my-hf-model --mem-size 1M --knn 32 --json
"""


@click.command("inspect", epilog=EPILOG_INSPECT)
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--mem-size", help="also show what converting each block to this memory adds")
@memory_options
@model_options
@json_option("print JSON instead of a table")
@quiet_option
@fail_cleanly
def inspect(
    model_path,
    mem_size,
    as_json,
    quiet,
    trust_remote_code,
    trust_pickle,
    config_path,
    **memory_settings,
):
    """List the FFN blocks of MODEL (an HF directory, a checkpoint, a .pt2 or a .pt file)."""
    from ..api import graph_memory_lookups
    from ..costs import BYTES_PER_DTYPE, ffn_flops_per_token, memory_cost
    from ..passes import FIND_PASSES, TransformState, run_passes
    from ..passes.rewrite import ffn_parameters
    from ..runtime import MemoryLayer

    context = click.get_current_context()
    given = [
        "/".join(param.opts + param.secondary_opts)
        for param in context.command.params
        if param.name in memory_settings
        and context.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE
    ]
    if given and not mem_size:
        raise MemcompileError(f"{given[0]} describes the memory of --mem-size: add --mem-size")
    steps = steps_for(quiet, as_json)
    # Lazy value tables stay unbuilt: listing the blocks reads no values.
    loaded = load(model_path, steps, trust_remote_code, trust_pickle, config_path,
                  materialize=False)  # fmt: skip
    with steps("tracing"):
        found = run_passes(TransformState(loaded.model), FIND_PASSES)
        blocks, moe_labels = found.blocks, found.moe_blocks
        moe = list(moe_labels.values())
    config = memory_config(mem_size, **memory_settings) if mem_size else None
    rows = []
    for block in blocks:
        params = ffn_parameters(loaded.model, block)
        row = {
            "index": block.index,
            "path": block.path,
            "kind": block.kind,
            "d_model": block.d_model,
            "d_hidden": block.d_hidden,
            "activation": block.activation,
            "params": params,
            "ffn_flops_per_token": ffn_flops_per_token(block),
        }
        if config is not None:
            cost = memory_cost(block, config)
            row.update(
                memory_params=cost.layer_params,
                value_params=cost.value_params,
                memory_flops_per_token=cost.flops_per_token,
                memory_bytes={d: cost.bytes(d) for d in BYTES_PER_DTYPE},
            )
        rows.append(row)
    memories = [
        {"path": path, "rows": layer.n_keys**2, "v_dim": layer.v_dim, "heads": layer.heads,
         "knn": layer.knn, "mode": layer.config.mode, "shared_values": bool(layer._pool)}
        for path, layer in loaded.model.named_modules()
        if isinstance(layer, MemoryLayer)
    ]  # fmt: skip
    lookups = graph_memory_lookups(loaded.model)
    result = {"model": str(model_path), "kind": loaded.kind, "blocks": rows, "moe_blocks": moe,
              "memory_layers": memories, "graph_memory_lookups": lookups}  # fmt: skip
    if as_json:
        echo_json(result)
        return
    click.echo(f"{len(blocks)} FFN blocks in {model_path} ({loaded.kind})")
    if lookups:
        click.echo(
            f"the graph already calls {lookups} memory lookups (memcompile:: ops): a block "
            "augmented with one is listed with the memory's parameters"
        )
    header = (
        f"{'index':>10} {'path':<40} {'kind':<11} {'d_model':>7} {'d_hidden':>8} {'params':>12}"
    )
    if config is not None:
        header += f" {'+mem params':>12} {'FLOPs/tok ffn->mem':>22}"
    click.echo(header)
    for row in rows:
        line = (
            f"{row['index']!s:>10} {row['path']:<40} {row['kind']:<11} {row['d_model']:>7} "
            f"{row['d_hidden']:>8} {row['params']:>12,}"
        )
        if config is not None:
            flops = f"{row['ffn_flops_per_token']:,} -> {row['memory_flops_per_token']:,}"
            line += f" {row['memory_params']:>12,} {flops:>22}"
        click.echo(line)
    if config is not None and rows:
        values = rows[0]["value_params"]
        sizes = ", ".join(f"{d} {human_bytes(values * b)}" for d, b in BYTES_PER_DTYPE.items())
        share = "one table shared by all converted blocks" if config.share_values else "per block"
        click.echo(f"value table: {values:,} parameters ({sizes}), {share}")
    for label, path in moe_labels.items():
        click.echo(f"mixture-of-experts block {label} (not convertible): {path}")
    for m in memories:
        shared = ", shared values" if m["shared_values"] else ""
        click.echo(
            f"memory layer ({m['mode']}): {m['path']}: {m['rows']:,} x {m['v_dim']} values, "
            f"heads {m['heads']}, knn {m['knn']}{shared}"
        )
