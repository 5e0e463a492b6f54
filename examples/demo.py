"""`make demo`: convert the bundled example transformer with the `memcompile` CLI.

The seeded example model (tiny_transformer.py) is exported with torch.export to
build/demo/example.pt2; `memcompile inspect` lists its FFN blocks; `memcompile convert`
turns blocks 1 and 2 into memory layers, once in augment mode (outputs must stay
bit-identical) and once in replace mode (FFNs removed); then both converted programs run
on an input of another shape than the export's, against the original.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memcompile  # noqa: E402  (also registers the memcompile ops for torch.export.load)

from tiny_transformer import build_model  # noqa: E402

CLI = [sys.executable, "-m", "memcompile.cli"]


def run(*args: str) -> str:
    print("$ memcompile " + " ".join(args), flush=True)
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if done.returncode != 0:  # the command's own error line, and its exit status
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)
    return done.stdout


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace, model) -> None:
    """One-line errors (exit 2) before the export and the CLI calls."""
    try:
        memcompile.MemoryConfig(mem_size=args.mem_size)
    except memcompile.MemcompileError as error:
        parser.error(str(error))
    labels = [str(block.index) for block in memcompile.find_ffn_blocks(model)]
    unknown = [x for x in args.layers.split(",") if x.strip() not in labels]
    if unknown:
        parser.error(f"--layers {unknown[0]} is not a block of the example: choose from "
                     f"{','.join(labels)}")  # fmt: skip
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: give a folder")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2", help="block indices to convert")
    parser.add_argument("--mem-size", default="64K", help="value rows, e.g. 64K = 256**2")
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    args = parser.parse_args()
    model = build_model(seed=0).eval()
    _check(parser, args, model)

    example = torch.randint(0, model.cfg.vocab_size, (2, 16))
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=128)}
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / "example.pt2"
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=(dims,)), source)
    print(f"exported the example model to {source}\n")

    print(run("inspect", str(source), "--mem-size", args.mem_size, "--quiet"))
    probe = torch.randint(
        0, model.cfg.vocab_size, (3, 25), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        reference = torch.export.load(source).module()(probe)
    ok = True
    for mode in ("augment", "replace"):
        target = args.out / f"example-{mode}.pt2"
        output = run(
            "convert", str(source), "--layers", args.layers, "--mem-size", args.mem_size,
            "--mode", mode, "-o", str(target), "--force", "--quiet",
        )  # fmt: skip
        print("".join(f"  {line}\n" for line in output.splitlines()), end="")
        converted = torch.export.load(target).module()
        with torch.no_grad():
            out = converted(probe)
        if mode == "augment":
            same = torch.equal(out, reference)
            ok &= same
            print(f"  output check (batch 3, 25 tokens): identical to the original: {same}\n")
        else:
            finite = out.shape == reference.shape and bool(torch.isfinite(out).all())
            ok &= finite
            change = (out - reference).abs().max().item()
            print(
                f"  output check: shape {tuple(out.shape)} as before, finite: {finite}; "
                f"max |change| {change:.3g} (the new memory is untrained)\n"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
