"""Helpers of the GPU benchmarks (bench_kernels.py, kernel_sweep.py, bench_inference.py):
medians of `triton.testing.do_bench`, copy bandwidth, a host-synchronisation check, the
kernel table of a step, skewed row ids, and the fastest shape of a sweep."""

from __future__ import annotations

import math
import sys

import torch


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def runs_without_host_sync(fn) -> bool | str:
    """True if one call of `fn` makes no host-device synchronisation, else the error saying
    where (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as error:
        return str(error)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def kernel_table(fn, calls: int) -> str:
    """The GPU kernels of `calls` calls by device time, as torch.profiler's table: where a
    step's time goes, for reading (a table that fails is reported, the run goes on)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
    except Exception as error:
        return f"no table: {type(error).__name__}: {error}"
    print(table, file=sys.stderr, flush=True)
    return table


def zipf_rows(n_rows: int, shape, generator, s: float) -> torch.Tensor:
    """Row ids drawn with probability ~ 1 / rank**s over a random ranking of the rows: a
    few keys much busier than the rest, as trained memories have (Lample et al. 2019 report
    uneven key usage). The row pass sums each row in one program, so the busiest rows set
    its tail."""
    dev = generator.device
    probs = torch.arange(1, n_rows + 1, device=dev, dtype=torch.float64).pow(-s)
    ranked = torch.multinomial(probs, math.prod(shape), replacement=True, generator=generator)
    ranking = torch.randperm(n_rows, device=dev, generator=generator)
    return ranking[ranked].view(shape)


def busiest_row(indices: torch.Tensor) -> int:
    return int(torch.bincount(indices.reshape(-1)).max())


def not_built(config: str, section: str) -> list[dict]:
    """A row naming the ops whose Triton kernel could not be built during `section` (they
    ran the PyTorch reference, kernels/cuda.py, so that section's rows time the reference
    for them), and a clean slate for the next section; no row when all were built."""
    from memcompile.kernels import cuda

    unbuilt = cuda.take_unbuilt()
    if not unbuilt:
        return []
    return [{"config": config, "what": f"{section}: Triton kernels not built, the reference ran",
             "ok": unbuilt}]  # fmt: skip


def fastest(rows: list[dict], name_key: str, default: str) -> dict | None:
    """Of a sweep's rows that computed the default's result, the fastest: {name_key: its
    name, "ms", "of_default": its time over the default shape's}; None without a timed
    default."""
    timed = [r for r in rows if "ms" in r and r.get("same_result")]
    base = [r["ms"] for r in timed if r[name_key] == default]
    if not base:
        return None
    best = min(timed, key=lambda r: r["ms"])
    share = round(best["ms"] / base[0], 3)
    return {name_key: best[name_key], "ms": best["ms"], "of_default": share}
