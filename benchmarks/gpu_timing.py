"""Helpers of the GPU benchmarks (bench_kernels.py, kernel_sweep.py, bench_inference.py):
the device, medians of `triton.testing.do_bench`, copy bandwidth, a host-synchronisation
check, the kernel table of a step, skewed row ids, and a sweep of block shapes.

In a rehearsal (gpu_shapes.REHEARSAL) the device is the CPU, Triton's interpreter runs
the kernels, and a time is one call's wall time: a check that the code runs and that
every block shape computes the default's result, not a measurement."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from gpu_shapes import REHEARSAL

DEVICE = "cpu" if REHEARSAL else "cuda"
NO_GPU = "not measured: a rehearsal on the CPU"
# The rows of kernels.json and inference.json: a timing has "ms" (a sweep's also
# "same_result": whether it computed the default shape's result); a check has "ok"; a
# step that raised has "error"; "not_built" names the ops whose kernels could not be
# built, so the reference ran; "table" is a profile for reading; "not_measured" says why
# not (a rehearsal). `problems` lists the rows that say something went wrong.


def start() -> str | None:
    """Prepare this process for a GPU benchmark: None, or why it cannot run. A rehearsal
    installs the ops' Triton kernels for CPU tensors (kernels/cuda.py), so the ops and
    the layer run them as they would on a GPU."""
    if not REHEARSAL:
        if torch.cuda.is_available():
            return None
        return "needs a CUDA GPU (benchmarks/rehearsal.py runs it on the CPU)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "a rehearsal runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1"
    from memcompile.kernels import cuda

    cuda.register_cuda_kernels("cpu")
    return None


def bench(fn) -> float:
    if REHEARSAL:
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def runs_without_host_sync(fn) -> dict:
    """A row's verdict: {"ok": True} if one call of `fn` makes no host-device
    synchronisation, else {"ok": False, "error": where} (torch.cuda.set_sync_debug_mode)."""
    if REHEARSAL:
        return {"not_measured": NO_GPU}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return {"ok": True}
    except RuntimeError as error:
        return {"ok": False, "error": str(error)}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    src = torch.randn(2**20 if REHEARSAL else 2**29, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def device_name() -> str:
    """The GPU's name, for a result's header (a rehearsal has none)."""
    return NO_GPU if REHEARSAL else torch.cuda.get_device_name()


def kernel_table(fn, calls: int, row_limit: int = 15) -> str:
    """The GPU kernels of `calls` calls by device time, as torch.profiler's table: where a
    step's time goes, for reading (a table that fails is reported, the run goes on)."""
    from torch.profiler import ProfilerActivity, profile

    if REHEARSAL:
        return f"no table: {NO_GPU}"
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=row_limit)
    except Exception as error:  # a profile is for reading, never a reason to lose the rows
        return f"no table: {type(error).__name__}: {error}"


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
             "not_built": unbuilt}]  # fmt: skip


DEFAULT = "default"  # the sweep row of the kernels' own choice of shape


def sweep_shapes(
    shapes: list[tuple], names: str, install, run, timer=bench, result=None, annotate=None
) -> tuple[list[dict], dict | None]:
    """`run` under the kernels' own choice of shape (the row named DEFAULT: call it before
    anything is installed), then under each of `shapes`: `install(shape)` makes the kernels
    use a shape, `timer(run)` times it (ms), and `result()` (default: `run()`) must compute
    what the default computes (allclose at 1e-2: bf16's rounding). Returns a row a shape,
    {"shape": "NAME=value ...", "ms", "same_result"} and `annotate(shape)`'s fields, or
    "error" / "not_built" for a shape that raised or whose kernels could not be built (the
    sweep goes on; without a default result there is nothing to compare with, and it
    stops); and the fastest shape that computed the default's result, {"shape", "ms",
    "of_default": its time over the default's}, or None. The caller restores what
    `install` changed (`hooks_restored`)."""
    from memcompile.kernels import cuda

    result = result or run
    rows, expected = [], None
    for shape in [None, *shapes]:
        if shape is not None:
            install(shape)
        row = {"shape": DEFAULT if shape is None else shape_name(names, shape)}
        try:  # a bad shape may fail at any step, asynchronously: at the comparison's sync too
            ms = timer(run)
            got = _outputs(result())
            unbuilt = cuda.take_unbuilt()
            if unbuilt:  # too big for this GPU: the reference ran, not the shape
                row["not_built"] = unbuilt
            elif expected is None:
                expected, row["ms"], row["same_result"] = got, round(ms, 4), True
            else:
                same = all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
                           for a, b in zip(got, expected, strict=True))  # fmt: skip
                row |= {"ms": round(ms, 4), "same_result": same}
                row |= annotate(shape) if annotate else {}
        except Exception as error:  # one shape that fails must not end the sweep
            row["error"] = _error(error)
        rows.append(row)
        if expected is None:  # the default failed
            return rows, None
    timed = [r for r in rows if "ms" in r and r["same_result"]]
    best = min(timed, key=lambda r: r["ms"])
    return rows, {"shape": best["shape"], "ms": best["ms"],
                  "of_default": round(best["ms"] / rows[0]["ms"], 3)}  # fmt: skip


def shape_name(names: str, shape: tuple) -> str:
    return " ".join(f"{k}={v}" for k, v in zip(names.split(), shape))


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:200]}"


@contextlib.contextmanager
def hooks_restored(module, *names):
    """The module's attributes `names` as they were, once the block ends."""
    saved = [getattr(module, name) for name in names]
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(module, name, value)


def problems(rows: list[dict]) -> list[dict]:
    """The rows that report a failure: a check that failed, a step that raised, a kernel
    not built, a block shape whose result differs from the default's."""
    return [
        r for r in rows
        if r.get("ok") is False or r.get("same_result") is False or "error" in r
        or "not_built" in r
    ]  # fmt: skip


# The JSON files a GPU session writes, and the keys holding their rows.
RESULT_ROWS = {
    "kernel_check.json": ("checks",),
    "kernels.json": ("rows",),
    "inference.json": ("layers", "decode", "projections", "decode_sweep", "not_built"),
}


def problems_in(folder: Path) -> list[str]:
    """The failing rows (`problems`) of the results in `folder`, one line each, naming
    their file; a file that cannot be read (a step stopped while writing it) is one."""
    found = []
    for name, keys in RESULT_ROWS.items():
        path = Path(folder) / name
        if not path.exists():
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            found.append(f"{name}: unreadable: {error}")
            continue
        rows = [row for key in keys for row in result.get(key) or []]
        found += [f"{name}: {json.dumps(row)}" for row in problems(rows)]
    return found


if __name__ == "__main__":  # gpu_check.sh's last step: what failed, where the log ends
    lines = problems_in(Path(sys.argv[1]))
    print("\n".join(lines) + f"\nproblems: {len(lines)}" if lines else "problems: none")
