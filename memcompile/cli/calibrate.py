"""`memcompile calibrate`: train a checkpoint's memory layers to imitate the FFNs they replaced."""

from __future__ import annotations

import sys

import click

from ..runtime import MemcompileError
from ..runtime.errors import first_line, quieted_loggers
from ..runtime.outputs import refuse_existing
from .common import (
    checkpoint_output_options,
    echo_json,
    fail_cleanly,
    load,
    model_options,
    result_options,
    steps_for,
)

EPILOG_CALIBRATE = """\b
Examples:
  memcompile convert ./my-hf-model --layers 2,3 --mem-size 16K -o ./ckpt
  memcompile calibrate ./ckpt --original ./my-hf-model --data texts.txt -o ./ckpt-cal
  memcompile calibrate ./ckpt --original ./my-hf-model --synthetic --steps 100 -o ./ckpt-cal
A replace-mode checkpoint holds no FFN weights: --original is the model it was converted
from, whose FFNs the memory layers learn to imitate (and whose tokenizer reads --data).
"""


@click.command("calibrate", epilog=EPILOG_CALIBRATE)
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
@click.option(
    "--max-length",
    type=int,
    default=128,
    show_default=True,
    help="tokens per text (with --synthetic: per sample, default 64)",
)
@click.option("--seed", type=int, default=0, show_default=True)
@model_options
@checkpoint_output_options()
@result_options
@fail_cleanly
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

    from .. import checkpoint
    from ..calibrate import calibrate as run_calibration
    from ..calibrate import position_limit, synthetic_batches, text_batches

    refuse_existing(output, force, inputs=[model_path, original, data, config_path])
    if data is not None and synthetic:
        raise MemcompileError("give --data FILE.txt or --synthetic, not both")
    if data is None and not synthetic:
        raise MemcompileError("give the calibration inputs: --data FILE.txt or --synthetic")
    if steps < 1:
        raise MemcompileError(f"--steps must be at least 1, got {steps}")
    if not -(2**63) <= seed < 2**63:  # torch's generators take an int64
        raise MemcompileError(f"--seed must fit in 64 bits (a signed int64), got {seed}")
    if max_length < 1:
        raise MemcompileError(f"--max-length must be at least 1, got {max_length}")
    given = click.get_current_context().get_parameter_source("max_length")
    synthetic_length = max_length if given == click.core.ParameterSource.COMMANDLINE else 64
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
    steps_bar = steps_for(quiet, as_json)
    loaded = load(model_path, steps_bar, trust_remote_code, trust_pickle, None)
    teacher = load(original, steps_bar, trust_remote_code, trust_pickle, config_path).model
    limit = position_limit(teacher)
    if given != click.core.ParameterSource.COMMANDLINE and limit is not None:
        # the defaults fit the model: a model of 32 positions is no reason to refuse
        max_length, synthetic_length = min(max_length, limit), min(synthetic_length, limit)
    if texts:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(original)
        except (OSError, ValueError, TypeError) as error:
            # transformers' first line may only announce a list ("... from one of: ").
            reason = first_line(error).strip()
            detail = f" ({reason})" if reason and not reason.endswith(":") else ""
            raise MemcompileError(
                f"--data needs a tokenizer and --original {original} has none that "
                f"loads{detail}: give --original with its tokenizer files, or use --synthetic"
            ) from None
        batches = text_batches(tokenizer, texts, max_length=max_length)
        if not _reads_words(tokenizer, batches):
            raise MemcompileError(
                f"--data needs a tokenizer and the one --original {original} gives reads the "
                "text as special or unknown tokens only (transformers builds an empty one "
                "where tokenizer files are missing): give --original with its tokenizer "
                "files, or use --synthetic"
            )
    else:
        batches = synthetic_batches(teacher, seq_len=synthetic_length, seed=seed)
    from tqdm import tqdm

    with tqdm(total=steps, desc="calibrating", file=sys.stderr, disable=steps_bar.quiet) as bar:

        def progress(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        with quieted_loggers(["memcompile.calibrate"]):  # its warnings: said below, once
            report = run_calibration(
                loaded.model, teacher, batches, steps=steps, lr=lr, seed=seed, callback=progress
            )
    for worse in report.worse():
        raise MemcompileError(
            f"calibration made block {worse.index} worse on held-out tokens (relative error "
            f"{worse.error_before:.4g} -> {worse.error_after:.4g}): lower --lr; nothing written"
        )
    with steps_bar(f"saving {output}"):
        checkpoint.save(loaded.model, output, force=force, pickled_source=loaded.pickled_source)
    if as_json:
        result = {
            "output": str(output),
            "steps": steps,
            "layers": [asdict(c) for c in report.layers],
        }
        echo_json(result)
        return
    click.echo("relative error of each memory layer against the FFN it replaced (held-out tokens)")
    click.echo(f"{'block':>10} {'path':<40} {'tokens':>8} {'before':>8} {'after':>8}")
    for c in report.layers:
        click.echo(
            f"{c.index!s:>10} {c.path:<40} {c.tokens:>8,} {c.error_before:>8.3f} "
            f"{c.error_after:>8.3f}"
        )
    click.echo(f"wrote {output}")


def _reads_words(tokenizer, batches) -> bool:
    """Whether the tokenizer gave any token but its special ones (unknown, padding...)."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    for batch in batches:
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        if any(int(i) not in special for i in ids.unique()):
            return True
    return False
