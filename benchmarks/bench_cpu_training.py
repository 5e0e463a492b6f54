"""CPU training step of a Memory+ layer: its C++ kernels against PyTorch alone.

One step (forward, backward, AdamW step) of a Memory+ layer (d_model 256, 256^2 values,
4 heads, knn 32, fp32) at 512 and 2,048 tokens, with memcompile's C++ CPU kernels of
pk_topk and bag_backward (kernels/training_kernels.cc) and with the PyTorch references
alone (as where no compiler built them), the two called in turn in one run; also the
layer's training forward alone, and its backward (forward and backward, less the forward).
Medians. Writes
benchmarks/results/cpu_training.json (or --out) and prints a Markdown table.

    python benchmarks/bench_cpu_training.py [--tokens 512,2048] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from bench_args import positive_float, positive_int, results_path, token_counts, write_json
from bench_onnx import medians_ms  # round-robin medians: host drift hits all alike

from memcompile.kernels import cpu
from memcompile.runtime import MemoryConfig, MemoryLayer

D_MODEL, N_KEYS = 256, 256
CONFIG = MemoryConfig(mem_size=N_KEYS**2, heads=4, knn=32, k_dim=256)


def on_pytorch_alone(fn):
    """fn with the C++ kernels switched off, as where no compiler built them."""

    def run():
        with cpu.pytorch_only():
            return fn()

    return run


def training_step(layer, optimizer, x):
    def step():
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()

    return step


def op_calls(layer, x):
    """The layer's training forward (pk_topk through the bag), and forward and backward
    (bag_backward through pk_topk's backward) without the optimizer."""

    def forward():
        layer(x)

    def forward_backward():
        layer(x).square().mean().backward()
        layer.zero_grad()

    return forward, forward_backward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=token_counts, default="512,2048")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count())
    parser.add_argument("--seconds", type=positive_float, default=1.0, help="time per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    path = results_path(parser, args.out, "cpu_training.json")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assert cpu._native(), "the C++ kernels are built (a C++17 compiler is on the PATH)"
    layer = MemoryLayer(D_MODEL, D_MODEL, CONFIG)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, D_MODEL)
        step = training_step(layer, optimizer, x)
        forward, forward_backward = op_calls(layer, x)
        ms = medians_ms({
            "step": step, "step, PyTorch alone": on_pytorch_alone(step),
            "forward": forward, "forward, PyTorch alone": on_pytorch_alone(forward),
            "both": forward_backward, "both, PyTorch alone": on_pytorch_alone(forward_backward),
        }, args.seconds)  # fmt: skip
        for suffix in ("", ", PyTorch alone"):  # a backward needs its forward: the difference
            ms[f"backward{suffix}"] = ms[f"both{suffix}"] - ms[f"forward{suffix}"]
        for part in ("step", "forward", "backward"):
            mine, alone = ms[part], ms[f"{part}, PyTorch alone"]
            rows.append({
                "tokens": tokens, "part": part, "cpp_ms": round(mine, 2),
                "pytorch_ms": round(alone, 2), "ratio": round(mine / alone, 3),
            })  # fmt: skip
    result = {
        "benchmark": "cpu_training", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads",
        "torch": torch.__version__,
        "layer": f"Memory+, d_model {D_MODEL}, {N_KEYS}^2 values, heads 4, knn 32, fp32, AdamW",
        "rows": rows,
    }  # fmt: skip
    write_json(path, result)
    print("| tokens | part | C++ kernels ms | PyTorch alone ms | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['part']} | {r['cpp_ms']} | {r['pytorch_ms']} | {r['ratio']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
