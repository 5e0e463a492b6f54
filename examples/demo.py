"""Convert the bundled example transformer and show what changed.

Run by `make demo`. It builds the seeded example model (tiny_transformer.py), lists its FFN
blocks, converts two of them in augment mode (outputs must stay bit-identical) and in
replace mode (FFNs removed), and prints parameter counts and the output checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memcompile  # noqa: E402

from tiny_transformer import build_model  # noqa: E402


def _parse_layers(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2", help="block indices to convert, e.g. 1,2")
    parser.add_argument("--mem-size", default="64K", help="value rows, e.g. 64K = 256**2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    original = build_model(args.seed).eval()
    ids = torch.randint(
        0, original.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        reference = original(ids)

    blocks = memcompile.find_ffn_blocks(original)
    print(f"example model: {memcompile.count_parameters(original):,} parameters")
    print(f"FFN blocks found: {len(blocks)}")
    print(f"  {'index':>5}  {'path':<16} {'kind':<6} {'d_model':>7} {'d_hidden':>8}  activation")
    for b in blocks:
        widths = f"{b.d_model:>7} {b.d_hidden:>8}"
        print(f"  {b.label:>5}  {b.path:<16} {b.kind:<6} {widths}  {b.activation}")

    layers = _parse_layers(args.layers)
    for mode in ("augment", "replace"):
        model = build_model(args.seed).eval()
        model, report = memcompile.transform(
            model, layers=layers, mem_size=args.mem_size, mode=mode, return_report=True
        )
        with torch.no_grad():
            out = model(ids)
        print(f"\n{mode}: {report.summary()}")
        print(
            f"  parameters: {report.params_before:,} -> {report.params_after:,} "
            f"(FFN removed {report.ffn_params_removed:,}, memory added "
            f"{report.memory_params_added:,})"
        )
        if mode == "augment":
            same = torch.equal(out, reference)
            print(f"  output check: identical to the original: {same}")
            if not same:
                return 1
        else:
            ok = out.shape == reference.shape and bool(torch.isfinite(out).all())
            diff = (out - reference).abs().max().item()
            print(
                f"  output check: shape {tuple(out.shape)} as before, finite: {ok}; "
                f"max |change| {diff:.3g} (the memory is untrained)"
            )
            if not ok:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
