"""GPU benchmark of the memory-layer kernels: ours (Triton) against baselines in the same run.

For the "small" and "1.3B-like" configs of ANCHORS.md (bf16 table, one bag of
heads*knn = 128 rows per token): bag forward, bag forward+backward, pk_topk forward and
forward+backward, the whole Memory+ layer forward+backward, and a dense SwiGLU FFN
(hidden 4*d) forward+backward of the same d_model; medians of triton.testing.do_bench;
achieved bandwidth against a device-to-device copy measured in the same run. Also checks
that a training step of the layer makes no host-device synchronisation.

"values training step": the values' share of a training step (bag forward, backward and the
optimizer step) with fused updates (`memcompile.fuse_value_updates`: row-wise Adagrad and
lazy Adam, fp32 state, updated in the backward's kernel) against the unfused step (bag
forward+backward with a dense value gradient, then `torch.optim.AdamW(fused=True)`), for
bf16 and fp32 tables; first the fused kernels are checked against the PyTorch path.
Writes benchmarks/results/kernels.json (or --out) and prints a Markdown table.

    python benchmarks/bench_kernels.py [--configs 1.3B,small] [--sections kernels,values,sweep]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_shapes import DTYPE, FUSED_CHECK, HALF, HEADS, KNN, TRAINING
from gpu_timing import (
    DEVICE,
    bench,
    busiest_row,
    copy_bandwidth,
    device_name,
    kernel_table,
    not_built,
    runs_without_host_sync,
    start,
    zipf_rows,
)
from kernel_sweep import sweep


def torch_lookup(values, indices, weights):
    """What a user writes in plain torch: gather then weighted sum."""
    return (values[indices] * weights[..., None].to(values.dtype)).sum(1)


def run_config(name: str, tokens: int, n_keys: int, v_dim: int, copy_bw: float) -> list[dict]:
    from timing_layer import memory_layer_for_timing

    from memcompile.kernels import cuda, ops, reference, row_lists
    from memcompile.runtime import MemoryConfig

    dev, dt = DEVICE, DTYPE
    rows_total, picks = n_keys**2, HEADS * KNN
    g = torch.Generator(device=dev).manual_seed(0)
    values = torch.randn(rows_total, v_dim, device=dev, generator=g).to(dt)
    indices = torch.randint(0, rows_total, (tokens, picks), device=dev, generator=g)
    weights = torch.softmax(torch.randn(tokens, picks, device=dev, generator=g), -1)
    grad = torch.randn(tokens, v_dim, device=dev, generator=g).to(dt)
    bag_bytes = tokens * picks * v_dim * 2  # rows gathered, as ANCHORS.md counts them
    results = []

    def record(what, impl, ms, moved=None):
        row = {"config": name, "what": what, "impl": impl, "ms": round(ms, 4)}
        if moved is not None:
            row["TB/s"] = round(moved / (ms * 1e-3) / 1e12, 3)
            row["of_copy"] = round(moved / (ms * 1e-3) / copy_bw, 3)
        results.append(row)

    offsets = torch.arange(tokens, device=dev) * picks
    record("bag fwd", "torch F.embedding_bag",
           bench(lambda: F.embedding_bag(indices.view(-1), values, offsets, mode="sum",
                                         per_sample_weights=weights.view(-1).to(dt))),
           bag_bytes)  # fmt: skip
    record(
        "bag fwd",
        "memcompile triton",
        bench(lambda: cuda.bag_cuda(values, indices, weights)),
        bag_bytes,
    )

    values32 = values.float().requires_grad_()
    w32 = weights.view(-1).clone().requires_grad_()

    def torch_bag_step():
        out = F.embedding_bag(indices.view(-1), values32, offsets, mode="sum",
                              per_sample_weights=w32)  # fmt: skip
        out.backward(grad.float())

    record("bag fwd+bwd", "torch F.embedding_bag (fp32 table)", bench(torch_bag_step))

    def our_bag_step():
        out = cuda.bag_cuda(values, indices, weights)
        cuda.bag_backward_cuda(grad, values, indices, weights)
        return out

    record("bag fwd+bwd", "memcompile triton", bench(our_bag_step))
    # A hot row: one pick of every token on row 0 (a collapsed key early in training). The
    # row pass sums a row's pairs in one program, so this row is one serial loop.
    hot = indices.clone()
    hot[:, 0] = 0
    record("bag bwd", "memcompile triton, uniform rows",
           bench(lambda: cuda.bag_backward_cuda(grad, values, indices, weights)))  # fmt: skip
    touched = torch.unique(indices)
    record("bag bwd", "memcompile triton, row-sparse (touched rows only; unique not timed)",
           bench(lambda: cuda.bag_backward_rows_cuda(grad, values, indices, weights, touched)))
    record("bag bwd: its reverse index alone", "torch.sort + torch.searchsorted",
           bench(lambda: row_lists.reverse_index(indices, rows_total)))  # fmt: skip
    record("bag bwd", f"memcompile triton, one row in all {tokens} tokens",
           bench(lambda: cuda.bag_backward_cuda(grad, values, hot, weights)))  # fmt: skip
    # Zipf-skewed rows: at 1.3B-like, s = 0.5 touches 78% of rows (uniform: 87%), its busiest
    # row has ~1,000 pairs; s = 0.8 touches 58%, busiest ~28,000, 37% of pairs in rows of
    # more than 16.
    for s in (0.5, 0.8):
        skewed = zipf_rows(rows_total, indices.shape, g, s)
        ms = bench(lambda x=skewed: cuda.bag_backward_cuda(grad, values, x, weights))
        busiest = busiest_row(skewed)
        record("bag bwd", f"memcompile triton, Zipf s={s} rows (busiest: {busiest} pairs)", ms)

    q = torch.randn(tokens, HEADS, 2 * HALF, device=dev, generator=g).to(dt)
    keys = torch.randn(HEADS, 2, n_keys, HALF, device=dev, generator=g).to(dt)
    record("pk_topk fwd", "torch reference", bench(lambda: reference.pk_topk(q, keys, KNN)))
    record("pk_topk fwd", "memcompile triton", bench(lambda: cuda.pk_topk_cuda(q, keys, KNN)))
    qg, kg = q.clone().requires_grad_(), keys.clone().requires_grad_()

    def topk_step():
        scores, _ = ops.pk_topk(qg, kg, KNN)
        scores.sum().backward()

    record("pk_topk fwd+bwd", "memcompile triton", bench(topk_step))
    grad_scores = torch.randn(tokens, HEADS, KNN, device=dev, generator=g)
    _, top = cuda.pk_topk_cuda(q, keys, KNN)
    record("pk_topk bwd", "torch reference",
           bench(lambda: reference.pk_topk_backward(grad_scores, q, keys, top)))  # fmt: skip
    record("pk_topk bwd", "memcompile triton + cuBLAS",
           bench(lambda: cuda.pk_topk_backward_cuda(grad_scores, q, keys, top)))  # fmt: skip
    # The Memory+ gating of the bag, forward and backward, as the layer's training step runs it.
    gate_in = torch.randn(tokens, v_dim, device=dev, generator=g).to(dt).requires_grad_()
    bag_out = torch.randn(tokens, v_dim, device=dev, generator=g).to(dt).requires_grad_()

    def gating_step(gate_fn):
        gate_in.grad = bag_out.grad = None  # as after zero_grad: no accumulation
        gate_fn(bag_out, gate_in).backward(grad)

    record("gating fwd+bwd", "torch (silu, product)",
           bench(lambda: gating_step(lambda b, s: b * F.silu(s))))  # fmt: skip
    record("gating fwd+bwd", "memcompile triton (silu_gate)",
           bench(lambda: gating_step(ops.silu_gate)))  # fmt: skip

    d = v_dim
    config = MemoryConfig(mem_size=rows_total, heads=HEADS, knn=KNN, k_dim=2 * HALF,
                          v_dim=v_dim).resolve(d)  # fmt: skip
    layer = memory_layer_for_timing(d, config, dev, dt)
    x = torch.randn(tokens, d, device=dev, generator=g).to(dt).requires_grad_()
    gy = torch.randn(tokens, d, device=dev, generator=g).to(dt)

    # As a training step after zero_grad(): the backward's gradients become the .grad
    # tensors, not added to the last step's (a 4.3 GB read-read-write of the value
    # gradient, 4.4 ms a step at 1.3B-like in the fourth H100 run).
    def layer_step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(gy)

    record("Memory+ layer fwd+bwd", "memcompile", bench(layer_step))
    table = kernel_table(layer_step, 5)
    print(table, file=sys.stderr, flush=True)
    results.append({"config": name, "what": "Memory+ layer fwd+bwd, kernels of 5 steps",
                    "table": table})  # fmt: skip
    ffn = torch.nn.ModuleDict({
        "gate": torch.nn.Linear(d, 4 * d, bias=False), "up": torch.nn.Linear(d, 4 * d, bias=False),
        "down": torch.nn.Linear(4 * d, d, bias=False)}).to(dev, dt)  # fmt: skip

    def ffn_step():
        x.grad = None
        ffn.zero_grad(set_to_none=True)
        ffn["down"](F.silu(ffn["gate"](x)) * ffn["up"](x)).backward(gy)

    record("dense SwiGLU FFN fwd+bwd", "torch (cuBLAS)", bench(ffn_step))

    results.append({"config": name, "what": "no host sync in a layer step"}
                   | runs_without_host_sync(layer_step))  # fmt: skip
    return results


def check_fused_update() -> list[dict]:
    """The Triton fused update against the PyTorch path (on the CPU) at a small size."""
    from memcompile.kernels import cuda, fused_update

    rows = []
    g = torch.Generator().manual_seed(0)
    tokens, n_rows, v_dim = FUSED_CHECK["tokens"], FUSED_CHECK["n_keys"] ** 2, FUSED_CHECK["v_dim"]
    for dt in (torch.float32, DTYPE):
        for opt in fused_update.OPTIMIZERS:
            values = torch.randn(n_rows, v_dim, generator=g).to(dt)
            indices = torch.randint(0, n_rows, (tokens, HEADS * KNN), generator=g)
            weights = torch.softmax(torch.randn(tokens, HEADS * KNN, generator=g), -1)
            grad = torch.randn(tokens, v_dim, generator=g).to(dt)
            shapes = fused_update.state_shapes(opt, tuple(values.shape))
            state = [torch.rand(shape, generator=g) for shape in shapes]
            cpu = [values.clone(), *[s.clone() for s in state], indices, weights, grad]
            gpu = [t.to(DEVICE) for t in (values, *state, indices, weights, grad)]
            hyper = (opt, 1e-2, 1e-8, 0.9, 0.999, 0.01, v_dim, 3, 1, False, True)
            want_w = fused_update.fused_row_update_reference(*cpu, None, None, *hyper)
            got_w = cuda.fused_row_update_cuda(*gpu, None, None, *hyper)
            err = max(
                ((a.double().cpu() - b.double()).norm() / b.double().norm()).item()
                for a, b in zip((gpu[0], gpu[1], got_w), (cpu[0], cpu[1], want_w))
            )
            tol = 1e-5 if dt == torch.float32 else 1e-2
            rows.append({"config": "check", "what": f"fused update {opt} {str(dt)[6:]}",
                         "ok": err < tol, "rel_err": err})  # fmt: skip
    return rows


def _unfused_step_ms(values, indices, weights, grad) -> float:
    """Bag forward+backward (dense value gradient), then AdamW(fused=True) on the table."""
    from memcompile.kernels import ops

    values.requires_grad_()
    adamw = torch.optim.AdamW([values], lr=1e-3, fused=True)

    def step():
        adamw.zero_grad(set_to_none=True)
        weights.grad = None
        ops.bag(values, indices, weights).backward(grad)
        adamw.step()

    ms = bench(step)
    adamw.zero_grad(set_to_none=True)
    values.requires_grad_(False)
    return ms


def _fused_step_ms(values, indices, weights, grad, optimizer: str) -> tuple[float, dict]:
    """The fused step; and whether one step runs with no host synchronisation (a row's
    verdict, gpu_timing.runs_without_host_sync)."""
    from memcompile.runtime.fused_table import FusedTable, ValueOptimizer

    table = FusedTable(values.requires_grad_(), ValueOptimizer(optimizer, 1e-3))

    def step():
        weights.grad = None
        table.bag(values, indices, weights).backward(grad)

    ms = bench(step)
    sync_free = runs_without_host_sync(step)
    values.requires_grad_(False)
    return ms, sync_free


def values_step(name: str, tokens: int, n_keys: int, v_dim: int, **_) -> list[dict]:
    """Values' share of a training step: bag forward, backward and update, fused or not."""
    dev, rows_total, picks = DEVICE, n_keys**2, HEADS * KNN
    g = torch.Generator(device=dev).manual_seed(0)
    indices = torch.randint(0, rows_total, (tokens, picks), device=dev, generator=g)
    weights = torch.softmax(torch.randn(tokens, picks, device=dev, generator=g), -1)
    weights.requires_grad_()
    results = []
    for dt in (DTYPE, torch.float32):
        grad = torch.randn(tokens, v_dim, device=dev, generator=g).to(dt)
        initial = torch.randn(rows_total, v_dim, device=dev, generator=g).to(dt)
        what = f"values step (fwd+bwd+update), {str(dt)[6:]} table"
        values = initial.clone()
        ms = _unfused_step_ms(values, indices, weights, grad)
        results.append({"config": name, "what": what, "ms": round(ms, 4),
                        "impl": "unfused: bag fwd+bwd, AdamW(fused=True)"})  # fmt: skip
        torch.cuda.empty_cache()
        for opt in ("rowwise_adagrad", "adam"):
            values.copy_(initial)
            ms, sync_free = _fused_step_ms(values, indices, weights, grad, opt)
            results.append({"config": name, "what": what, "ms": round(ms, 4),
                            "impl": f"memcompile fused {opt} (fp32 state)"})  # fmt: skip
            results.append({"config": name, "what": f"no host sync, fused {opt} {str(dt)[6:]}"}
                           | sync_free)  # fmt: skip
            torch.cuda.empty_cache()
        del values, initial
        torch.cuda.empty_cache()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 1.3B-like first: its rows hold the targets, and a run may be stopped by a time limit.
    parser.add_argument("--configs", default="1.3B,small")
    parser.add_argument("--sections", default="kernels,values",
                        help="any of kernels, values, sweep (block shapes of the kernels), "
                        "sweep-rows (of the row pass only)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    cannot = start()
    if cannot:
        print(f"bench_kernels.py {cannot}", file=sys.stderr)
        return 2
    copy_bw = copy_bandwidth()
    sections = args.sections.split(",")
    result = {
        "benchmark": "kernels",
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "copy_TB/s": round(copy_bw / 1e12, 3),
        "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def keep(new_rows: list[dict]) -> None:
        # Written after every step: a run stopped by gpu_check's time limit keeps its rows.
        result["rows"] += new_rows
        (args.out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
        for r in new_rows:
            print(f"  {json.dumps(r)}", file=sys.stderr, flush=True)

    if "values" in sections:
        keep(check_fused_update() + not_built("check", "fused update check"))
    # The targets' rows first, the sweep after them: a run cut short keeps the targets.
    for name in args.configs.split(","):
        if "kernels" in sections:
            keep(run_config(name, **TRAINING[name], copy_bw=copy_bw) + not_built(name, "kernels"))
            torch.cuda.empty_cache()
        if "values" in sections:
            keep(values_step(name, **TRAINING[name]) + not_built(name, "values step"))
            torch.cuda.empty_cache()
        if "sweep" in sections or "sweep-rows" in sections:
            sweep(name, **TRAINING[name], copy_bw=copy_bw, keep=keep,
                  rows_only="sweep" not in sections)  # fmt: skip
            torch.cuda.empty_cache()
    rows = result["rows"]
    print(f"device {result['device']}, copy {result['copy_TB/s']} TB/s")
    print("| config | what | implementation | ms | TB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(
                f"| {r['config']} | {r['what']} | {r['impl']} | {r['ms']} | {r.get('TB/s', '')} |"
            )
        else:
            verdict = "(a table: kernels.json)" if "table" in r else next(
                r[k] for k in ("error", "not_built", "ok", "not_measured") if k in r)  # fmt: skip
            print(f"| {r['config']} | {r['what']} | | {verdict} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
