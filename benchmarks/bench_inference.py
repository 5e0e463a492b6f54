"""Inference latency: a Memory+ layer against the dense SwiGLU FFN it replaces.

Per-layer latency at 1, 8, 64, 512 and 4096 tokens, memory layer and dense FFN (hidden 4*d)
measured side by side in one run: on the CPU always (d_model 1024, 512^2 values, fp32,
eager; one layer called again and again, its weights in the cache, and copies of it called
in turn, each call's weights read from memory as a model's layers are; the lookup's C++
kernel against its PyTorch reference; the layer and the FFN in bfloat16), on a GPU when
there is one (d_model 2048, 1024^2 values, bf16, eager and CUDA graph; host-resident values
against device-resident; programmatic dependent launch off against on; a decode token's
query and gate projections, cuBLAS against the layer's one launch). Then decode tokens/s of
a small converted causal LM against its dense original. Medians. Writes
benchmarks/results/inference.json (or --out) and prints a Markdown table.

    python benchmarks/bench_inference.py [--tokens 1,8,64,512,4096] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_args import positive_int, results_path, token_counts, write_json
from gpu_shapes import (
    DECODE_MEMORY,
    DECODE_SIZES,
    DECODE_TOKENS,
    DTYPE,
    HALF,
    HEADS,
    INFERENCE,
    INFERENCE_TOKENS,
    KNN,
    REHEARSAL,
)
from gpu_timing import (
    DEVICE,
    bench,
    device_name,
    hooks_restored,
    kernel_table,
    not_built,
    start,
    sweep_shapes,
)
from timing_layer import memory_layer_for_timing
from torch import nn

import memcompile
from memcompile.kernels import cpu
from memcompile.runtime import MemoryConfig, offload_values


class SwiGLU(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, 4 * d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), or 256 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=256 << 20)


def time_cpu(fns, x, budget_s: float = 4.0) -> list[float]:
    """Median ms of each fn(x), the fns called in turn: a drift of the shared host's state
    (another tenant, the clock) then moves all of them alike, not one. An fn may be a list
    of modules, called in rotation (see `cold_copies`)."""
    rotations = [fn if isinstance(fn, list) else [fn] for fn in fns]
    times = [[] for _ in fns]
    with torch.inference_mode():
        for calls in rotations:
            for call in calls:
                call(x)
        start = time.perf_counter()
        while len(times[0]) < 5 or (time.perf_counter() - start < budget_s and len(times[0]) < 400):
            for calls, timed in zip(rotations, times):
                call = calls[len(timed) % len(calls)]
                t0 = time.perf_counter()
                call(x)
                timed.append(time.perf_counter() - t0)
    return [statistics.median(timed) * 1e3 for timed in times]


def cold_copies(module: nn.Module, shared: torch.Tensor | None = None) -> list[nn.Module]:
    """Copies of `module` whose weights together fill twice the last-level cache, so that
    calling them in turn reads each call's weights from memory, as a model's layers do.
    A timed layer called alone keeps its weights in the cache (260 MB of L3 on some dev
    hosts hold a whole FFN). `shared` (the value table) stays one tensor: its rows are
    read at random either way."""
    skip = 0 if shared is None else shared.numel() * shared.element_size()
    size = sum(p.numel() * p.element_size() for p in module.parameters()) - skip
    count = -(-2 * last_level_cache_bytes() // size)
    memo = {} if shared is None else {id(shared): shared}
    return [module] + [copy.deepcopy(module, dict(memo)) for _ in range(count - 1)]


def time_cuda(fn, x, graph: bool) -> float:
    import triton.testing

    with torch.inference_mode():
        if REHEARSAL:  # no CUDA graphs on the CPU: one eager call
            return bench(lambda: fn(x))
        if not graph:
            return triton.testing.do_bench(lambda: fn(x), warmup=25, rep=200, return_mode="median")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(x)
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn(x)
        return triton.testing.do_bench(cuda_graph.replay, warmup=25, rep=200,
                                       return_mode="median")  # fmt: skip


def kernel_times(fn, x, calls: int = 20) -> str:
    """The GPU kernels of `calls` eager calls, by device time: where a layer's time goes."""
    with torch.inference_mode():
        table = kernel_table(lambda: fn(x), calls, row_limit=12)
    return f"kernels of {calls} calls, {x.shape[0]} tokens\n{table}"


def versus_row(memory, tokens: int, mode: str, ms: float, ratio: float, note: str) -> dict:
    """A row timing one variant of the layer (`ms`) with `ratio` against another, same run."""
    return {"device": memory.keys.device.type, "d_model": memory.d_in,
            "values": f"{memory.n_keys}^2", "tokens": tokens, "mode": mode,
            "memory_ms": round(ms, 4), "ffn_ms": None, "ratio": round(ratio, 3),
            "note": note}  # fmt: skip


def pdl_rows(memory, d, dtype) -> list[dict]:
    """The layer at few tokens, CUDA graphs, with programmatic dependent launch off (the
    row) against on (its ratio), side by side."""
    from memcompile.kernels import pdl

    rows = []
    for tokens in DECODE_SIZES:
        x = torch.randn(tokens, d, device=DEVICE, dtype=dtype)
        pdl.ENABLED = False
        try:
            off_ms = time_cuda(memory, x, graph=True)
        finally:
            pdl.ENABLED = True
        on_ms = time_cuda(memory, x, graph=True)
        rows.append(versus_row(memory, tokens, "cuda graph, PDL off", off_ms, on_ms / off_ms,
                               "ratio: PDL on against off, same run"))  # fmt: skip
        print(f"  cuda graph, {tokens} tokens: PDL off {off_ms * 1e3:.1f} us, on "
              f"{on_ms * 1e3:.1f} us", file=sys.stderr)  # fmt: skip
    return rows


def layer_rows(device, d, n_keys, dtype, token_counts, gpu: bool):
    """The layer against the dense FFN at each token count; with `gpu`, eager and CUDA graph,
    then the kernels, PDL off and on, and host-resident values."""
    config = MemoryConfig(mem_size=n_keys**2, heads=HEADS, knn=KNN, k_dim=2 * HALF).resolve(d)
    memory = memory_layer_for_timing(d, config, device, dtype).eval()
    dense = SwiGLU(d).to(device, dtype).eval()
    rows = []
    if not gpu:
        cold = {"memory": cold_copies(memory, memory.values), "dense": cold_copies(dense)}
    for tokens in token_counts:
        x = torch.randn(tokens, d, device=device, dtype=dtype)
        modes = ["eager", "cuda graph"] if gpu else ["eager", "eager, weights from memory"]
        for mode in modes:
            if mode == "eager, weights from memory":
                mem_ms, ffn_ms = time_cpu([cold["memory"], cold["dense"]], x)
            elif not gpu:
                mem_ms, ffn_ms = time_cpu([memory, dense], x)
            else:
                graph = mode == "cuda graph"
                mem_ms, ffn_ms = time_cuda(memory, x, graph), time_cuda(dense, x, graph)
            rows.append({
                "device": device, "d_model": d, "values": f"{n_keys}^2", "tokens": tokens,
                "mode": mode, "memory_ms": round(mem_ms, 4), "ffn_ms": round(ffn_ms, 4),
                "ratio": round(mem_ms / ffn_ms, 3),
            })  # fmt: skip
            print(
                f"  {device} {mode:<10} {tokens:>5} tokens: memory {mem_ms:.3f} ms, "
                f"FFN {ffn_ms:.3f} ms, ratio {mem_ms / ffn_ms:.2f}",
                file=sys.stderr,
            )
    if not gpu:
        rows += native_lookup_rows(memory, d, token_counts)
    if gpu:
        for tokens in (1, INFERENCE_TOKENS[-1]):
            print(kernel_times(memory, torch.randn(tokens, d, device=device, dtype=dtype)),
                  file=sys.stderr)  # fmt: skip
        rows += pdl_rows(memory, d, dtype)
        x = torch.randn(1, d, device=device, dtype=dtype)
        with torch.inference_mode():
            expected = memory(x)
        device_ms = {graph: time_cuda(memory, x, graph) for graph in (False, True)}
        offload_values(memory)  # pinned: the bag kernel reads the picked rows over PCIe
        with torch.inference_mode():
            torch.testing.assert_close(memory(x), expected)
        for graph in (False, True):
            host_ms = time_cuda(memory, x, graph)
            mode = f"host-resident values, {'cuda graph' if graph else 'eager'}"
            rows.append(versus_row(memory, 1, mode, host_ms, host_ms / device_ms[graph],
                                   "ratio against device-resident values, same mode"))  # fmt: skip
    return rows


def bfloat16_rows(d, n_keys, token_counts):
    """The layer and the dense FFN both in bfloat16 on the CPU (a bfloat16 checkpoint served
    as it is), called in turn; weights warm."""
    config = MemoryConfig(mem_size=n_keys**2, heads=HEADS, knn=KNN, k_dim=2 * HALF).resolve(d)
    memory = memory_layer_for_timing(d, config, "cpu", torch.bfloat16).eval()
    dense = SwiGLU(d).to(torch.bfloat16).eval()
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, d, dtype=torch.bfloat16)
        mem_ms, ffn_ms = time_cpu([memory, dense], x)
        rows.append({
            "device": "cpu", "d_model": d, "values": f"{n_keys}^2", "tokens": tokens,
            "mode": "eager, bfloat16", "memory_ms": round(mem_ms, 4),
            "ffn_ms": round(ffn_ms, 4), "ratio": round(mem_ms / ffn_ms, 3),
        })  # fmt: skip
        print(f"  cpu bfloat16 {tokens:>5} tokens: memory {mem_ms:.3f} ms, FFN {ffn_ms:.3f} ms",
              file=sys.stderr)  # fmt: skip
    return rows


def native_lookup_rows(memory, d, token_counts):
    """The CPU layer with its C++ kernels (kernels/cpu.py: the whole layer in one call up to
    cpu.MAX_TOKENS tokens, else the lookup) against the same layer on PyTorch alone
    (kernels/reference.py), called in turn."""
    def on_pytorch(x):
        with cpu.pytorch_only():
            return memory(x)

    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, d)
        native_ms, reference_ms = time_cpu([memory, on_pytorch], x)
        rows.append(versus_row(memory, tokens, "eager, PyTorch alone", reference_ms,
                               native_ms / reference_ms,
                               "ratio: C++ kernels against PyTorch alone, same run"))  # fmt: skip
        print(f"  cpu {tokens} tokens: layer with the C++ kernels {native_ms:.3f} ms, on "
              f"PyTorch alone {reference_ms:.3f} ms", file=sys.stderr)  # fmt: skip
    return rows


def projection_rows(d, dtype, token_counts):
    """A decode token's query and gate projections (d -> heads*k_dim, d -> d): two cuBLAS
    calls against the one `linears` launch the layer makes, CUDA graphs, side by side."""
    from memcompile.kernels import ops

    widths = (HEADS * 2 * HALF, d)
    weights = [torch.randn(w, d, device=DEVICE, dtype=dtype) * d**-0.5 for w in widths]
    biases = [torch.randn(w, device=DEVICE, dtype=dtype) for w in widths]
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, d, device=DEVICE, dtype=dtype)
        cublas_ms = time_cuda(lambda x: [F.linear(x, w, b) for w, b in zip(weights, biases)],
                              x, graph=True)  # fmt: skip
        triton_ms = time_cuda(lambda x: ops.linears(x, weights, biases), x, graph=True)
        moved = sum(w.numel() * w.element_size() for w in weights)
        rows.append({"tokens": tokens, "maps": f"{d} -> {widths[0]}, {d} -> {widths[1]}",
                     "cublas_ms": round(cublas_ms, 4), "linears_ms": round(triton_ms, 4),
                     "linears_tb_per_s": round(moved / triton_ms / 1e9, 2),
                     "ratio": round(triton_ms / cublas_ms, 3)})  # fmt: skip
        print(f"  projections, {tokens} tokens: cuBLAS {cublas_ms * 1e3:.1f} us, linears "
              f"{triton_ms * 1e3:.1f} us", file=sys.stderr)  # fmt: skip
    return rows


# (BLOCK_K, scan warps, scan stages, SPLITS, merge warps) of a decode token's top-k
# (triton_topk.scan_blocks and split_scan); the first is the kernels' choice at one token
# (the sweep times that choice first anyway, its "default" row). In the fifth H100
# run the scan took 7.9 us (two 32-key steps a program) and the merge 5.7 us at one token.
DECODE_SCAN_VARIANTS = [(32, 8, 2, 16, 4), (64, 8, 2, 16, 4), (64, 4, 2, 16, 4),
                        (32, 8, 2, 32, 4), (32, 4, 2, 32, 4), (64, 8, 2, 8, 4),
                        (128, 8, 1, 8, 4), (64, 8, 2, 16, 2), (64, 8, 2, 16, 8)]  # fmt: skip
# (BLOCK_O, BLOCK_I, num_warps, num_stages) of the decode projections
# (triton_linear.linear_blocks); the first is the kernels' choice.
LINEAR_VARIANTS = [(16, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 3), (16, 128, 4, 6),
                   (32, 256, 4, 4), (16, 256, 8, 4), (32, 128, 4, 4), (16, 512, 8, 4)]  # fmt: skip


def install_scan_shape(shape) -> None:
    """Make the decode top-k use `shape`, a DECODE_SCAN_VARIANTS entry."""
    from memcompile.kernels import triton_topk

    block_k, warps, stages, splits, merge_warps = shape
    triton_topk.scan_blocks = lambda *_: (1, block_k, warps, stages)
    triton_topk.split_scan = lambda *_: (splits, merge_warps)


def install_linear_shape(shape) -> None:
    """Make the decode projections use `shape`, a LINEAR_VARIANTS entry."""
    from memcompile.kernels import triton_linear

    triton_linear.linear_blocks = lambda *_: shape


def time_shapes(run, x, shapes, names: str, install, label: str) -> list[dict]:
    """run(x) under the kernels' own choice of shape, then under each of `shapes`
    (`install(shape)` sets one), timed in CUDA graphs, each output compared with the
    first's (gpu_timing.sweep_shapes); a last row names the fastest."""

    def result():
        with torch.inference_mode():
            return run(x)

    rows, best = sweep_shapes(shapes, names, install, result,
                              timer=lambda _: time_cuda(run, x, graph=True))  # fmt: skip
    for row in rows:
        outcome = row.get("ms", row.get("error", row.get("not_built")))
        print(f"  {label}, {row['shape']}: {outcome} ms", file=sys.stderr)
    if best is not None:  # to set the default from
        rows.append(best | {"shape": f"fastest: {best['shape']}"})
    return rows


def decode_sweep(d, n_keys, dtype, token_counts=DECODE_SIZES) -> list[dict]:
    """A decode lookup (top-k, softmax, gated bag) under each DECODE_SCAN_VARIANTS shape."""
    from memcompile.kernels import cuda, triton_topk

    g = torch.Generator(device=DEVICE).manual_seed(0)
    keys = torch.randn(HEADS, 2, n_keys, HALF, device=DEVICE, generator=g).to(dtype)
    values = (torch.randn(n_keys**2, d, device=DEVICE, generator=g) * d**-0.5).to(dtype)
    rows = []
    with hooks_restored(triton_topk, "scan_blocks", "split_scan"):
        for tokens in token_counts:
            q = torch.randn(tokens, HEADS, 2 * HALF, device=DEVICE, generator=g) * HALF**-0.5
            swilu = torch.randn(tokens, d, device=DEVICE, generator=g).to(dtype)

            def lookup(q, swilu=swilu):
                return cuda.pk_lookup_cuda(q, keys, values, KNN, swilu)

            found = time_shapes(lookup, q.to(dtype), DECODE_SCAN_VARIANTS,
                                "BLOCK_K warps stages SPLITS merge_warps", install_scan_shape,
                                f"decode lookup, {tokens} tokens")  # fmt: skip
            rows += [{"tokens": tokens} | row for row in found]
    return rows


def projection_sweep(d, dtype) -> list[dict]:
    """One decode token's projections (query and gate in one launch; the output map alone)
    under each LINEAR_VARIANTS shape, with the weights' TB/s."""
    from memcompile.kernels import ops, triton_linear

    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(1, d, device=DEVICE, generator=g).to(dtype)
    maps = {"query + gate": (HEADS * 2 * HALF, d), "output": (d,)}
    rows = []
    with hooks_restored(triton_linear, "linear_blocks"):
        for name, widths in maps.items():
            weights = [(torch.randn(w, d, device=DEVICE, generator=g) * d**-0.5).to(dtype)
                       for w in widths]  # fmt: skip
            biases = [torch.randn(w, device=DEVICE, generator=g).to(dtype) for w in widths]

            def project(x, weights=weights, biases=biases):
                return ops.linears(x, weights, biases)

            moved = sum(w.numel() * w.element_size() for w in weights)
            found = time_shapes(project, x, LINEAR_VARIANTS, "BLOCK_O BLOCK_I warps stages",
                                install_linear_shape, f"projections ({name}), 1 token")  # fmt: skip
            for row in found:
                if "ms" in row:
                    row["TB/s"] = round(moved / row["ms"] / 1e9, 2)
                rows.append({"maps": name} | row)
    return rows


def decode_rows(device, dtype, new_tokens=DECODE_TOKENS):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:  # the GPU machine may have torch and triton only
        print("  decode rows skipped: transformers is not installed", file=sys.stderr)
        return []

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)  # fmt: skip
    rows = []
    n_keys = int(DECODE_MEMORY["mem_size"] ** 0.5)
    for name in ("dense", f"memory (layers 1,2; {n_keys}^2 values)"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device, dtype).eval()
        if name != "dense":
            memcompile.transform(model, layers=[1, 2], **DECODE_MEMORY)
        prompt = torch.randint(0, 4096, (1, 8), device=device)
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.inference_mode():
            model.generate(prompt, **options)  # warm-up
            times = []
            for _ in range(3):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(prompt, **options)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        tps = new_tokens / statistics.median(times)
        rows.append({"device": device, "model": name, "decode_tokens_per_s": round(tps, 1)})
        print(f"  {device} decode {name}: {tps:.1f} tokens/s", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=token_counts,
                        default=",".join(map(str, INFERENCE_TOKENS)))  # fmt: skip
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--skip-cpu", action="store_true", help="GPU rows only")
    parser.add_argument("--decode-sweep", action="store_true",
                        help="also time a decode lookup under each top-k shape, and the "
                        "decode projections under each block shape")  # fmt: skip
    args = parser.parse_args()
    path = results_path(parser, args.out, "inference.json")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    counts = args.tokens
    layers, decode, projections, sweep, unbuilt, gpu = [], [], [], [], [], None
    # A rehearsal's kernels run in Triton's interpreter on CPU tensors: no CPU rows then.
    if not (args.skip_cpu or REHEARSAL):
        layers += layer_rows("cpu", 1024, 512, torch.float32, counts, gpu=False)
        layers += bfloat16_rows(1024, 512, [t for t in counts if t <= 512])
        decode += decode_rows("cpu", torch.float32)
    if REHEARSAL or torch.cuda.is_available():
        cannot = start()
        if cannot:
            print(f"bench_inference.py {cannot}", file=sys.stderr)
            return 2
        gpu = device_name()
        d, n_keys = INFERENCE["d_model"], INFERENCE["n_keys"]
        # Ops whose kernels a section could not build: its rows timed the PyTorch reference
        # for them (the sweeps record their own).
        layers += layer_rows(DEVICE, d, n_keys, DTYPE, counts, gpu=True)
        unbuilt += not_built("inference", "layers")
        projections = projection_rows(d, DTYPE, [t for t in counts if t <= 16])
        unbuilt += not_built("inference", "projections")
        if args.decode_sweep:
            sweep = decode_sweep(d, n_keys, DTYPE)
            sweep += projection_sweep(d, DTYPE)
        decode += decode_rows(DEVICE, DTYPE)
        unbuilt += not_built("inference", "decode")
    result = {"benchmark": "inference", "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{args.threads} torch threads",
              "gpu": gpu,
              "torch": torch.__version__, "layers": layers, "decode": decode,
              "projections": projections, "decode_sweep": sweep,
              "not_built": unbuilt}  # fmt: skip
    write_json(path, result)
    print("| device | d_model | values | tokens | mode | Memory+ ms | dense FFN ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in layers:
        print(
            f"| {r['device']} | {r['d_model']} | {r['values']} | {r['tokens']} | {r['mode']} | "
            f"{r['memory_ms']} | {r['ffn_ms']} | {r['ratio']} |"
        )
    if any("PyTorch alone" in str(r["mode"]) for r in layers):
        print("(rows 'PyTorch alone': the layer on PyTorch's ops, in the Memory+ column; their "
              "ratio is the C++ kernels' time over it, not the dense FFN's)")  # fmt: skip
    if projections:
        print("\n| tokens | query + gate projections | cuBLAS ms | linears ms | ratio |")
        print("|---|---|---|---|---|")
        for r in projections:
            print(f"| {r['tokens']} | {r['maps']} | {r['cublas_ms']} | {r['linears_ms']} | "
                  f"{r['ratio']} |")  # fmt: skip
    if sweep:
        print("\n| decode kernel | shape | ms | same result |")
        print("|---|---|---|---|")
        for r in sweep:
            what = f"lookup, {r['tokens']} tokens" if "tokens" in r else f"{r['maps']} projections"
            outcome = r.get("ms", r.get("error", r.get("not_built")))
            print(f"| {what} | {r['shape']} | {outcome} | "
                  f"{r.get('same_result', '')} |")  # fmt: skip
    print("\n| device | model | decode tokens/s |")
    print("|---|---|---|")
    for r in decode:
        print(f"| {r['device']} | {r['model']} | {r['decode_tokens_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
