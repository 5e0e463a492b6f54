"""`memcompile export`: write a converted checkpoint as an ONNX model."""

from __future__ import annotations

import click

from ..runtime import MemcompileError
from ..runtime.config import human_bytes
from ..runtime.outputs import refuse_existing
from .common import (
    echo_json,
    fail_cleanly,
    force_option,
    load,
    model_options,
    result_options,
    steps_for,
)

EPILOG_EXPORT = """\b
Examples:
  memcompile export ./ckpt --onnx model.onnx                  # standard ONNX ops
  memcompile export ./ckpt --onnx model.onnx --form custom    # com.memcompile nodes
  memcompile export ./ckpt --onnx model-fp16.onnx --dtype float16 --opset 18
Run it: memcompile.runtime.ort_session("model.onnx") (registers the native kernels).
"""


def _token_inputs(model, batch: int, seq_len: int) -> dict:
    """Example token ids (and an attention mask, when the model takes one)."""
    import inspect

    import torch

    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    parameters = inspect.signature(model.forward).parameters
    if not vocab or "input_ids" not in parameters:
        missing = "config.vocab_size" if not vocab else "input_ids argument"
        raise MemcompileError(
            f"memcompile export makes Hugging Face-style inputs (input_ids from "
            f"config.vocab_size) and {type(model).__name__} has no {missing}: call "
            "memcompile.export_onnx(model, example_inputs, path) from Python"
        )
    if batch < 1 or seq_len < 1:
        raise MemcompileError(f"--batch and --seq-len must be positive, got {batch}, {seq_len}")
    # Past the model's positions the example would index out of range, or exhaust memory
    # on attention scores before the export begins.
    longest = getattr(config, "max_position_embeddings", None)
    if isinstance(longest, int) and seq_len > longest:
        raise MemcompileError(
            f"--seq-len {seq_len} is longer than the model's {longest} positions "
            f"(config.max_position_embeddings): give at most {longest}"
        )
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator)}
    if "attention_mask" in parameters:
        # One padded position: an all-ones mask would let the model skip masking when traced.
        mask = torch.ones(batch, seq_len, dtype=torch.int64)
        mask[0, 0] = 0 if seq_len > 1 else 1
        inputs["attention_mask"] = mask
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        # A shorter decoder example: its length is an axis of its own in the ONNX graph.
        decoder_len = max(2, seq_len // 2)
        ids = torch.randint(0, vocab, (batch, decoder_len), generator=generator)
        inputs["decoder_input_ids"] = ids
    segments = getattr(config, "type_vocab_size", None)
    if "token_type_ids" in parameters and isinstance(segments, int) and segments > 1:
        # Without this input the graph would read every token as segment 0 (BERT's pairs).
        ids = torch.randint(0, segments, (batch, seq_len), generator=generator)
        inputs["token_type_ids"] = ids
    return inputs


@click.command("export", epilog=EPILOG_EXPORT)
@click.argument("model_path", metavar="CKPT", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(), help="ONNX file to write")
@click.option(
    "--form",
    type=click.Choice(["decomposed", "custom"]),
    default="decomposed",
    show_default=True,
    help="standard ONNX ops, or com.memcompile nodes with native kernels",
)
@click.option("--opset", type=int, help="ONNX opset, 18 to 23 (default 20)")
@click.option(
    "--seq-len", type=int, default=8, show_default=True, help="example length (stays dynamic)"
)
@click.option(
    "--batch", type=int, default=2, show_default=True, help="example batch (stays dynamic)"
)
@click.option(
    "--dtype", type=click.Choice(["float32", "float16"]), help="cast the model before export"
)
@click.option("--static", is_flag=True, help="fix batch and sequence to the example's")
@model_options
@force_option
@result_options
@fail_cleanly
def export(
    model_path,
    onnx_path,
    form,
    opset,
    seq_len,
    batch,
    dtype,
    static,
    force,
    as_json,
    quiet,
    trust_remote_code,
    trust_pickle,
    config_path,
):
    """Export CKPT (a converted checkpoint) to ONNX, with dynamic batch and sequence."""
    from pathlib import Path

    import torch

    from ..onnx_export import check_exportable, export_onnx, external_data_path

    # A large model's weights go to a side file, ONNX_PATH.data: it is an output too.
    side_file = external_data_path(onnx_path)
    for output, file in ((onnx_path, True), (side_file, False)):
        refuse_existing(output, force, inputs=[model_path, config_path], file=file)
    steps = steps_for(quiet, as_json)
    loaded = load(model_path, steps, trust_remote_code, trust_pickle, config_path)
    check_exportable(loaded.model)  # before the inputs: what cannot export says why first
    model = loaded.model if dtype is None else loaded.model.to(getattr(torch, dtype))
    inputs = _token_inputs(model, batch, seq_len)
    with steps(f"exporting {onnx_path}"):
        export_onnx(
            model, inputs, onnx_path, form=form, opset=opset, dynamic=not static, force=force
        )
    import onnx  # export_onnx has checked that it is installed

    exported = onnx.load(onnx_path, load_external_data=False)
    result = {
        "output": str(onnx_path),
        "form": form,
        "opset": next(o.version for o in exported.opset_import if o.domain == ""),
        "inputs": [i.name for i in exported.graph.input],
        "outputs": [o.name for o in exported.graph.output],
        "custom_nodes": sum(n.domain == "com.memcompile" for n in exported.graph.node),
        "bytes": Path(onnx_path).stat().st_size,
    }
    if side_file.exists():
        result["external_data"] = str(side_file)
        result["bytes"] += side_file.stat().st_size
    if as_json:
        echo_json(result)
    else:
        click.echo(
            f"wrote {onnx_path} ({form} form, opset {result['opset']}, inputs "
            f"{', '.join(result['inputs'])} -> {', '.join(result['outputs'])}, "
            f"{human_bytes(result['bytes'])}"
            + (f", weights in {side_file})" if "external_data" in result else ")")
        )
