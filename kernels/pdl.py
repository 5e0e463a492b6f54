"""Programmatic dependent launch (PDL) for the few-token kernels of inference.

A decode token's Memory+ layer is five short kernels in a row (projections, scan, merge,
bag, output projection), each waiting for the one before: on an H100 each boundary cost
about 1.5 us of CUDA-graph replay beyond the kernels' own time (49 us against 37,
2026-11-27). Launched with PDL (Hopper and newer), a kernel's programs are scheduled while
the previous kernel still runs. Each program first waits for the previous kernel to
complete and its writes to be visible (`griddepcontrol.wait`), before it reads or writes
anything, then lets the next kernel launch. So every kernel still completes after the one
before it, and order holds down the chain, whatever kernel came first.

Only for grids of at most two programs an SM: the next kernel's programs, waiting, hold
SM resources that the running kernel's later programs would need. `ENABLED = False` turns
it off (the benchmarks time both).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = True
# Triton 3.3 brought the launch option and `gdc_wait`; the package allows older ones.
_TRITON_HAS_PDL = hasattr(tl.extra.cuda, "gdc_wait")


def use_pdl(device: torch.device, programs: int) -> bool:
    """Whether a launch of `programs` programs on `device` uses PDL."""
    # ROCm's torch names its GPUs "cuda" too, and MI300s report a major version of 9.
    if not (ENABLED and _TRITON_HAS_PDL and device.type == "cuda" and torch.version.hip is None):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return grid_fits(*_architecture(index), programs)


def grid_fits(major: int, sms: int, programs: int) -> bool:
    """Whether a grid of `programs` takes PDL on a GPU of compute capability `major` with
    `sms` SMs: Hopper or newer, and at most two programs an SM."""
    return major >= 9 and programs <= 2 * sms


@functools.cache
def _architecture(index: int) -> tuple[int, int]:
    """(compute capability major, SM count) of CUDA device `index`: asked once, as a decode
    step launches these kernels many times."""
    properties = torch.cuda.get_device_properties(index)
    return properties.major, properties.multi_processor_count


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has completed and its writes are visible,
    then let the next kernel launch. Call first, before any load or store."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
