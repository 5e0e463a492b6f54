"""What the CPU benchmarks' command lines share: arguments checked as they are parsed (one
line and exit 2, as argparse says a wrong type), the results file refused before the run
where it cannot be written, and written whole or not at all."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# memcompile (so torch) is imported where it is used: bench_onnx.py sets OMP_NUM_THREADS
# after parsing its arguments and before torch loads.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive, finite number")
    return value


def token_counts(text: str) -> list[int]:
    """"1,8,64": token counts, each at least 1."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error} (a list like 1,8,64)") from None


def results_path(parser: argparse.ArgumentParser, out: Path, name: str) -> Path:
    """`out / name`, refused now (parser.error: one line, exit 2) if it cannot be written,
    rather than after the run, whose results would be lost."""
    from memcompile.runtime import MemcompileError
    from memcompile.runtime.outputs import refuse_existing

    path = out / name
    try:
        refuse_existing(path, force=True, file=True)  # results are rewritten run after run
    except MemcompileError as error:
        parser.error(f"--out: {error}")
    return path


def write_json(path: Path, result: dict) -> None:
    from memcompile.runtime.outputs import atomic_file

    with atomic_file(path, force=True) as staged:
        staged.write_text(json.dumps(result, indent=2) + "\n")
