"""The `memcompile` command line: inspect and convert models.

Exit codes: 0 success, 2 bad input or usage, 1 internal error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys

import click

from .checkpoint import refuse_existing
from .runtime import MemcompileError

EPILOG_INSPECT = """\b
Examples:
  memcompile inspect ./my-hf-model
  memcompile inspect ./my-hf-model --mem-size 1M --knn 32 --json
"""
EPILOG_CONVERT = """\b
Examples:
  memcompile convert ./my-hf-model --layers 4,12 --mem-size 1M -o ./my-hf-model-mem
  memcompile convert ./ckpt --layers 8 --mem-size 1M -o ./ckpt2   # convert more layers
  memcompile convert model.pt --trust-pickle --layers 1 -o out      # a torch.save()d module
  memcompile convert model.pt2 --layers 1,2 --mem-size 64K -o model-mem.pt2  # torch.export
"""


def _fail_cleanly(command):
    """Bad input -> one line on stderr and exit 2; anything else -> exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MemcompileError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            click.echo(f"internal error: {type(error).__name__}: {error}", err=True)
            sys.exit(1)

    return wrapper


class _Steps:
    """A progress bar per step that may take more than a second; silent when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextlib.contextmanager
    def __call__(self, description: str):
        if self.quiet:
            yield
            return
        from tqdm import tqdm

        with tqdm(
            total=1,
            desc=description,
            file=sys.stderr,
            leave=True,
            bar_format="{desc}: {bar:20} {elapsed}",
        ) as bar:
            yield
            bar.update(1)


def _model_options(command):
    command = click.option(
        "--config",
        "config_path",
        type=click.Path(exists=True),
        help="HF config.json giving the architecture of a bare state_dict",
    )(command)
    command = click.option(
        "--trust-pickle",
        is_flag=True,
        help="allow loading a pickled module (runs code from the file)",
    )(command)
    command = click.option(
        "--trust-remote-code",
        is_flag=True,
        help="allow HF models that need code from their repository",
    )(command)
    return command


def _memory_options(command):
    options = [
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            help="dtype of the memory's parameters (default: the block's)",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--qk-norm/--no-qk-norm", default=False, show_default=True),
        click.option(
            "--share/--no-share",
            "share_values",
            default=True,
            show_default=True,
            help="one value table for all converted layers",
        ),
        click.option(
            "--gating", type=click.Choice(["swilu", "none"]), default="swilu", show_default=True
        ),
        click.option("--v-dim", type=int, help="value width (default: d_model)"),
        click.option("--k-dim", type=int, help="key width (default: min(512, d_model))"),
        click.option("--knn", type=int, default=32, show_default=True),
        click.option("--heads", type=int, default=4, show_default=True),
    ]
    for option in options:
        command = option(command)
    return command


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _memory_config(mem_size, **options):
    from .runtime import MemoryConfig

    return MemoryConfig(mem_size=mem_size, **options)


def _load(path, steps, trust_remote_code, trust_pickle, config_path):
    from .model_io import load_model

    if steps.quiet:
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    with steps(f"loading {path}"):
        return load_model(
            path, trust_remote_code=trust_remote_code, trust_pickle=trust_pickle, config=config_path
        )


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EPILOG_INSPECT.replace("Examples:", "Examples:\n  memcompile convert --help"),
)
@click.version_option(package_name="memcompile")
def main() -> None:
    """Compile the FFN blocks of PyTorch models into product-key memory layers."""


@main.command(epilog=EPILOG_INSPECT)
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--mem-size", help="also show what converting each block to this memory adds")
@_memory_options
@_model_options
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@_fail_cleanly
def inspect(
    model_path,
    mem_size,
    as_json,
    quiet,
    trust_remote_code,
    trust_pickle,
    config_path,
    **memory_options,
):
    """List the FFN blocks of MODEL (an HF directory, a checkpoint, or a .pt file)."""
    from .api import find_ffn_blocks
    from .costs import BYTES_PER_DTYPE, ffn_flops_per_token, memory_cost
    from .passes.moe import find_moe_blocks

    steps = _Steps(quiet or as_json)
    loaded = _load(model_path, steps, trust_remote_code, trust_pickle, config_path)
    with steps("tracing"):
        blocks = find_ffn_blocks(loaded.model)
        moe = find_moe_blocks(loaded.model)
    config = _memory_config(mem_size, **memory_options) if mem_size else None
    rows = []
    for block in blocks:
        ffn = loaded.model.get_submodule(block.path)
        params = sum(p.numel() for p in ffn.parameters())
        if block.exit_path:
            params += sum(
                p.numel() for p in loaded.model.get_submodule(block.exit_path).parameters()
            )
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
    result = {"model": str(model_path), "kind": loaded.kind, "blocks": rows, "moe_blocks": moe}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{len(blocks)} FFN blocks in {model_path} ({loaded.kind})")
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
        sizes = ", ".join(f"{d} {_human_bytes(values * b)}" for d, b in BYTES_PER_DTYPE.items())
        share = "one table shared by all converted blocks" if config.share_values else "per block"
        click.echo(f"value table: {values:,} parameters ({sizes}), {share}")
    for path in moe:
        click.echo(f"mixture-of-experts block (not convertible): {path}")


@main.command(epilog=EPILOG_CONVERT)
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--layers", required=True, help="block indices to convert, e.g. 4,12 or encoder.2")
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
@_memory_options
@_model_options
@click.option("-o", "--output", required=True, type=click.Path(), help="checkpoint directory")
@click.option("--force", is_flag=True, help="overwrite an existing output")
@click.option(
    "--lazy-init",
    is_flag=True,
    help="store the value tables' init recipe instead of their bytes (large memories)",
)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@_fail_cleanly
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
    **memory_options,
):
    """Convert FFN blocks of MODEL into memory layers and write a checkpoint to OUTPUT."""
    from pathlib import Path

    from . import checkpoint
    from .api import transform
    from .passes.moe import find_moe_blocks

    refuse_existing(output, force)
    if (Path(model_path).suffix == ".pt2") != (Path(output).suffix == ".pt2"):
        raise MemcompileError(
            "a torch.export program (.pt2) converts to a .pt2 output, and only a .pt2 input "
            f"does: got {model_path} -> {output}"
        )
    config = _memory_config(mem_size, mode=mode, **memory_options)
    wanted = [part.strip() for part in layers.split(",") if part.strip()]
    steps = _Steps(quiet or as_json)
    loaded = _load(model_path, steps, trust_remote_code, trust_pickle, config_path)
    moe = find_moe_blocks(loaded.model)
    if moe:
        raise MemcompileError(
            f"{model_path} has mixture-of-experts blocks ({moe[0]}, ...): memcompile does not "
            "convert MoE blocks; `memcompile inspect` lists them"
        )
    with steps("converting"):
        model, report = transform(
            loaded.model, layers=wanted, config=config, lazy_init=lazy_init, return_report=True
        )
    if loaded.kind == "program":
        from .program import reexport, save_program

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
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(report.summary())
        click.echo(f"wrote {output}")


EPILOG_EXPORT = """\b
Examples:
  memcompile export ./ckpt --onnx model.onnx                  # standard ONNX ops
  memcompile export ./ckpt --onnx model.onnx --form custom    # com.memcompile nodes
  memcompile export ./ckpt --onnx model-fp16.onnx --dtype float16 --opset 18
Run it: memcompile.runtime.ort_session("model.onnx") (registers the native kernels).
"""


def _token_inputs(model, batch: int, seq_len: int) -> dict:
    """Example token ids (and an attention mask, when the model takes one)."""
    import inspect as pyinspect

    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    parameters = pyinspect.signature(model.forward).parameters
    if not vocab or "input_ids" not in parameters:
        raise MemcompileError(
            f"memcompile export makes token-id inputs, which {type(model).__name__} does not "
            "take: call memcompile.export_onnx(model, example_inputs, path) from Python"
        )
    if batch < 1 or seq_len < 1:
        raise MemcompileError(f"--batch and --seq-len must be positive, got {batch}, {seq_len}")
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator)}
    if "attention_mask" in parameters:
        # One padded position: an all-ones mask would let the model skip masking when traced.
        mask = torch.ones(batch, seq_len, dtype=torch.int64)
        mask[0, 0] = 0 if seq_len > 1 else 1
        inputs["attention_mask"] = mask
    return inputs


@main.command(epilog=EPILOG_EXPORT)
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
@_model_options
@click.option("--force", is_flag=True, help="overwrite an existing output")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@_fail_cleanly
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

    import onnx
    import torch

    from .onnx_export import export_onnx

    refuse_existing(onnx_path, force)
    steps = _Steps(quiet or as_json)
    loaded = _load(model_path, steps, trust_remote_code, trust_pickle, config_path)
    model = loaded.model if dtype is None else loaded.model.to(getattr(torch, dtype))
    inputs = _token_inputs(model, batch, seq_len)
    with steps(f"exporting {onnx_path}"):
        export_onnx(model, inputs, onnx_path, form=form, opset=opset, dynamic=not static)
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
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(
            f"wrote {onnx_path} ({form} form, opset {result['opset']}, inputs "
            f"{', '.join(result['inputs'])} -> {', '.join(result['outputs'])}, "
            f"{_human_bytes(result['bytes'])})"
        )


EPILOG_CALIBRATE = """\b
Examples:
  memcompile convert ./my-hf-model --layers 2,3 --mem-size 16K -o ./ckpt
  memcompile calibrate ./ckpt --original ./my-hf-model --data texts.txt -o ./ckpt-cal
  memcompile calibrate ./ckpt --original ./my-hf-model --synthetic --steps 100 -o ./ckpt-cal
A replace-mode checkpoint holds no FFN weights: --original is the model it was converted
from, whose FFNs the memory layers learn to imitate (and whose tokenizer reads --data).
"""


@main.command(epilog=EPILOG_CALIBRATE)
@click.argument("model_path", metavar="CKPT", type=click.Path())
@click.option(
    "--original",
    required=True,
    type=click.Path(),
    help="the model CKPT was converted from (HF directory, checkpoint or .pt)",
)
@click.option("--data", type=click.Path(dir_okay=False), help="text file, one sample per line")
@click.option("--synthetic", is_flag=True, help="random token ids instead of text (smoke test)")
@click.option("--steps", type=int, default=300, show_default=True, help="training steps")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="AdamW learning rate")
@click.option("--max-length", type=int, default=128, show_default=True, help="tokens per text")
@click.option("--seed", type=int, default=0, show_default=True)
@_model_options
@click.option("-o", "--output", required=True, type=click.Path(), help="checkpoint directory")
@click.option("--force", is_flag=True, help="overwrite an existing output")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@_fail_cleanly
def calibrate(
    model_path,
    original,
    data,
    synthetic,
    steps,
    lr,
    max_length,
    seed,
    output,
    force,
    as_json,
    quiet,
    trust_remote_code,
    trust_pickle,
    config_path,
):
    """Train the memory layers of CKPT to reproduce the FFNs they replaced; write OUTPUT."""
    from dataclasses import asdict
    from pathlib import Path

    from . import checkpoint
    from .calibrate import calibrate as run_calibration
    from .calibrate import synthetic_batches, text_batches

    refuse_existing(output, force)
    if (data is None) == (not synthetic):
        raise MemcompileError("give the calibration inputs: --data FILE.txt or --synthetic")
    if steps < 1:
        raise MemcompileError(f"--steps must be at least 1, got {steps}")
    texts = []
    if data is not None:
        try:
            texts = [t.strip() for t in Path(data).read_text().splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise MemcompileError(f"cannot read --data {data}: {error}") from None
        if not texts:
            raise MemcompileError(f"--data {data} has no text: one sample per line")
    if not checkpoint.is_checkpoint(model_path):
        raise MemcompileError(
            f"{model_path} is not a memcompile checkpoint: calibrate the output of "
            "`memcompile convert --mode replace`"
        )
    steps_bar = _Steps(quiet or as_json)
    loaded = _load(model_path, steps_bar, trust_remote_code, trust_pickle, None)
    teacher = _load(original, steps_bar, trust_remote_code, trust_pickle, config_path).model
    if texts:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(original)
        except (OSError, ValueError, TypeError) as error:
            raise MemcompileError(
                f"--data needs the tokenizer of --original {original}, which has none "
                f"({type(error).__name__}); use --synthetic or an HF model directory"
            ) from None
        batches = text_batches(tokenizer, texts, max_length=max_length)
    else:
        batches = synthetic_batches(teacher, seed=seed)
    from tqdm import tqdm

    with tqdm(total=steps, desc="calibrating", file=sys.stderr, disable=quiet or as_json) as bar:

        def progress(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        report = run_calibration(
            loaded.model, teacher, batches, steps=steps, lr=lr, seed=seed, callback=progress
        )
    with steps_bar(f"saving {output}"):
        checkpoint.save(loaded.model, output, force=force, pickled_source=loaded.pickled_source)
    if as_json:
        result = {
            "output": str(output),
            "steps": steps,
            "layers": [asdict(c) for c in report.layers],
        }
        click.echo(json.dumps(result, indent=2))
        return
    click.echo("relative error of each memory layer against the FFN it replaced (held-out tokens)")
    click.echo(f"{'block':>10} {'path':<40} {'tokens':>8} {'before':>8} {'after':>8}")
    for c in report.layers:
        click.echo(
            f"{c.index!s:>10} {c.path:<40} {c.tokens:>8,} {c.error_before:>8.3f} "
            f"{c.error_after:>8.3f}"
        )
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
