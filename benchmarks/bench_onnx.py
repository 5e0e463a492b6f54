"""Latency of a converted model in ONNX Runtime (CPU) against PyTorch eager (CPU).

A Llama-shaped model (d_model 256, 4 blocks, random weights) with blocks 1 and 2 replaced
by memory layers (64K = 256**2 rows, 4 heads, knn 32) is exported in both ONNX forms.
At batch 1 with 1, 64 and 512 tokens, the median latency of a forward pass is measured
for PyTorch eager, ONNX Runtime on the decomposed form, and ONNX Runtime on the custom
form with its native kernels (and, for reference, with the ONNX function bodies), all in
this one process on the same inputs, sampled round-robin. Each runtime gets --threads
threads (default 1, so a shared 2-core box treats them alike). Writes
benchmarks/results/onnx.json and prints a Markdown table.

Targets (issue 5): custom form no slower than PyTorch eager; decomposed within 1.5x.

    python benchmarks/bench_onnx.py [--out DIR] [--seconds S]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_args import positive_float, positive_int, results_path, write_json

TOKENS = (1, 64, 512)
MEMORY = dict(mem_size="64K", heads=4, knn=32)
LAYERS = [1, 2]


def make_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import memcompile

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).eval()
    memcompile.transform(model, layers=LAYERS, **MEMORY)
    return model


def medians_ms(runs: dict, seconds: float, min_rounds: int = 7) -> dict:
    """Median wall time in ms of each callable, sampled round-robin (one call of each per
    round) so that load on the machine falls on all of them alike; 2 warm-up rounds."""
    for _ in range(2):
        for run in runs.values():
            run()
    times: dict = {name: [] for name in runs}
    deadline = time.perf_counter() + seconds * len(runs)
    while min(len(t) for t in times.values()) < min_rounds or time.perf_counter() < deadline:
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(model, paths: dict, seconds: float, threads: int) -> list[dict]:
    import numpy as np
    import onnxruntime
    import torch

    from memcompile.runtime import ort_session

    def options():
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = threads
        return opts

    sessions = {
        "decomposed": ort_session(paths["decomposed"], options=options()),
        "custom": ort_session(paths["custom"], native=True, options=options()),
        "custom_function_bodies": ort_session(paths["custom"], native=False, options=options()),
    }
    rows = []
    for tokens in TOKENS:
        ids = torch.randint(0, model.config.vocab_size, (1, tokens))
        feed = {"input_ids": ids.numpy()}
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits.numpy()
        row: dict = {"tokens": tokens}
        runs = {"pytorch_eager": lambda ids=ids: model(input_ids=ids, use_cache=False)}
        for name, session in sessions.items():
            error = float(np.abs(session.run(None, feed)[0] - expected).max())
            row[f"ort_{name}_max_abs_error"] = error
            runs[f"ort_{name}"] = lambda s=session, f=feed: s.run(None, f)
        with torch.no_grad():
            row.update({f"{k}_ms": v for k, v in medians_ms(runs, seconds).items()})
        rows.append(row)
        print(f"{tokens} tokens: {row}", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| tokens | PyTorch eager | ORT decomposed | ORT custom (native kernels) "
        "| ORT custom (function bodies) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        eager = row["pytorch_eager_ms"]
        cells = [f"{eager:.2f} ms"]
        for name in ("decomposed", "custom", "custom_function_bodies"):
            ms = row[f"ort_{name}_ms"]
            cells.append(f"{ms:.2f} ms ({ms / eager:.2f}x)")
        lines.append(f"| {row['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> dict:
    return {
        "custom_no_slower_than_eager": all(
            r["ort_custom_ms"] <= r["pytorch_eager_ms"] for r in rows
        ),
        "decomposed_within_1.5x": all(
            r["ort_decomposed_ms"] <= 1.5 * r["pytorch_eager_ms"] for r in rows
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--seconds", type=positive_float, default=3.0, help="time per measurement"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1,
        help="threads of each runtime (1: fair on a busy box)",
    )  # fmt: skip
    args = parser.parse_args()
    path = results_path(parser, args.out, "onnx.json")
    # The native kernels use OpenMP: its thread count is read when the library loads.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import onnxruntime
    import torch

    import memcompile

    torch.set_num_threads(args.threads)
    model = make_model()
    with tempfile.TemporaryDirectory() as tmp:
        example = {"input_ids": torch.randint(0, 1024, (2, 16))}
        paths = {
            form: memcompile.export_onnx(model, example, Path(tmp) / f"{form}.onnx", form=form)
            for form in ("decomposed", "custom")
        }
        rows = measure(model, paths, args.seconds, args.threads)
    result = {
        "benchmark": "onnx",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, cpu, {os.cpu_count()} cores",
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "threads": args.threads,
        "model": (
            "Llama-shaped, d_model 256, 4 blocks, vocab 1024; blocks 1 and 2 replaced by "
            "memory layers (64K rows, 4 heads, knn 32, k_dim 256, one shared value table)"
        ),
        "batch": 1,
        "runs": rows,
        "targets_met": verdict(rows),
    }
    write_json(path, result)
    print(table(rows))
    print(f"\ntargets met: {result['targets_met']}")


if __name__ == "__main__":
    main()
