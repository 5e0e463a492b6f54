"""`memcompile convert`: replace (or augment) FFN blocks with memory layers; save the model."""

from __future__ import annotations

import click

from ..runtime import MemcompileError
from ..runtime.outputs import refuse_existing
from .common import (
    checkpoint_output_options,
    echo_json,
    fail_cleanly,
    layer_labels,
    load,
    memory_config,
    memory_options,
    model_options,
    result_options,
    steps_for,
)

EPILOG_CONVERT = """\b
Examples:
  memcompile convert ./my-hf-model --layers 4,12 --mem-size 1M -o ./my-hf-model-mem
  memcompile convert ./ckpt --layers 8 --mem-size 1M -o ./ckpt2   # convert more layers
  memcompile convert model.pt --trust-pickle --layers 1 -o out      # a torch.save()d module
  memcompile convert model.pt2 --layers 1,2 --mem-size 64K -o model-mem.pt2  # torch.export
"""


@click.command("convert", epilog=EPILOG_CONVERT)
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option(
    "--layers",
    required=True,
    help="block indices to convert, e.g. 4,12 or 0-3 or encoder.2 or decoder.0-1",
)
@click.option(
    "--mem-size",
    default="1M",
    show_default=True,
    help="value rows, a perfect square: 64K = 256**2, 1M = 1024**2, 16M = 4096**2",
)
@click.option(
    "--mode",
    type=click.Choice(["replace", "augment"]),
    default="replace",
    show_default=True,
    help="replace the FFN, or add the memory beside it",
)
@memory_options
@model_options
@checkpoint_output_options("checkpoint directory to write (a .pt2 file for a .pt2 input)")
@click.option(
    "--lazy-init",
    is_flag=True,
    help="store the value tables' init recipe instead of their bytes (large memories)",
)
@result_options
@fail_cleanly
def convert(
    model_path,
    layers,
    mem_size,
    mode,
    output,
    force,
    lazy_init,
    as_json,
    quiet,
    trust_remote_code,
    trust_pickle,
    config_path,
    **memory_settings,
):
    """Convert FFN blocks of MODEL into memory layers and write a checkpoint to OUTPUT."""
    from pathlib import Path

    from .. import checkpoint
    from ..api import transform

    refuse_existing(output, force, inputs=[model_path, config_path])
    if (Path(model_path).suffix == ".pt2") != (Path(output).suffix == ".pt2"):
        raise MemcompileError(
            "a torch.export program (.pt2) converts to a .pt2 output, and only a .pt2 input "
            f"does: got {model_path} -> {output}"
        )
    if lazy_init and Path(output).suffix == ".pt2":
        raise MemcompileError(
            "--lazy-init stores a table's init recipe in a checkpoint; a .pt2 program holds "
            "its values: drop --lazy-init"
        )
    config = memory_config(mem_size, mode=mode, **memory_settings)
    wanted = layer_labels(layers)
    steps = steps_for(quiet, as_json)
    # A checkpoint's lazy tables stay recipes: built here only to be written as bytes that
    # the recipe already describes (and perhaps larger than this machine's memory).
    loaded = load(
        model_path, steps, trust_remote_code, trust_pickle, config_path, materialize=False
    )
    with steps("converting"):
        model, report = transform(
            loaded.model, layers=wanted, config=config, lazy_init=lazy_init, return_report=True
        )
    if loaded.kind == "program":
        from ..program import reexport, save_program

        with steps("exporting"):
            program = reexport(loaded.program, model)
        with steps(f"saving {output}"):
            save_program(program, output, force=force)
    else:
        with steps(f"saving {output}"):
            checkpoint.save(model, output, force=force, pickled_source=loaded.pickled_source)
    result = {
        "output": str(output),
        "blocks_found": len(report.blocks_found),
        "converted": [b.index for b in report.converted],
        "mode": mode,
        "params_before": report.params_before,
        "params_after": report.params_after,
    }
    if as_json:
        echo_json(result)
    else:
        click.echo(report.summary())
        click.echo(f"wrote {output}")
