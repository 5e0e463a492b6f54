"""Peak RSS of `memcompile convert --lazy-init` as the memory grows (1M -> 16M rows).

A Llama-shaped model with d_model 2048 (2 blocks, random weights) is written as an HF
directory; each conversion runs in its own process and its peak RSS (ru_maxrss) is read
after it exits. With --lazy-init the value table is stored as its init recipe, so peak
RSS should not grow with mem-size. An eager conversion of a smaller memory is shown for
contrast. Writes benchmarks/results/lazy_init.json and prints a Markdown table.

    python benchmarks/bench_lazy_init.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_args import results_path, write_json

RUNS = [("1M", True), ("16M", True), ("256K", False)]


def make_model(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=1024,
    )
    path = directory / "llama-d2048"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def convert(model: Path, out: Path, mem_size: str, lazy: bool) -> dict:
    exe = Path(sys.executable).parent / "memcompile"
    cmd = [
        str(exe),
        "convert",
        str(model),
        "--layers",
        "1",
        "--mem-size",
        mem_size,
        "-o",
        str(out),
        "--quiet",
        "--json",
    ]
    if lazy:
        cmd.append("--lazy-init")
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"convert failed: {done.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib < before:
        raise SystemExit("ru_maxrss went down: run each conversion in a fresh benchmark process")
    disk = sum(f.stat().st_size for f in out.iterdir())
    return {
        "mem_size": mem_size,
        "lazy_init": lazy,
        "peak_rss_mib": round(peak_kib / 1024),
        "seconds": round(seconds, 1),
        "checkpoint_mib": round(disk / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--single", nargs=2, metavar=("MEM_SIZE", "LAZY"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:  # child mode: one conversion, so ru_maxrss of children is its own
        with tempfile.TemporaryDirectory() as tmp:
            row = convert(args.model, Path(tmp) / "out", args.single[0], args.single[1] == "1")
        print(json.dumps(row))
        return

    path = results_path(parser, args.out, "lazy_init.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp))
        for mem_size, lazy in RUNS:
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--model",
                    str(model),
                    "--single",
                    mem_size,
                    str(int(lazy)),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        shutil.rmtree(model)
    result = {
        "benchmark": "lazy_init",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} cores",
        "model": "Llama-shaped, d_model 2048, 2 blocks, block 1 converted",
        "runs": rows,
    }
    write_json(path, result)
    print("| mem-size | --lazy-init | peak RSS | checkpoint | time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mem_size']} | {'yes' if r['lazy_init'] else 'no'} | "
            f"{r['peak_rss_mib']:,} MiB | {r['checkpoint_mib']:,} MiB | {r['seconds']} s |"
        )


if __name__ == "__main__":
    main()
