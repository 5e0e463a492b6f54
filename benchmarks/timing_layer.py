"""The MemoryLayer the GPU benchmarks time, built without the slow part of its init."""

from __future__ import annotations

import torch
from torch import nn

from memcompile.runtime import MemoryConfig, MemoryLayer


def memory_layer_for_timing(
    d: int, config: MemoryConfig, device: str, dtype: torch.dtype
) -> MemoryLayer:
    """A d -> d MemoryLayer on `device`. On a GPU its values are drawn there, from the
    init's distribution but not its seeded stream: the seeded host init of a 1024^2 x 2048
    table takes about 20 s, much of a short GPU session, and no timing depends on them."""
    if device == "cpu":
        return MemoryLayer(d, d, config, device=device, dtype=dtype)
    layer = MemoryLayer(d, d, config, device=device, dtype=dtype, lazy_values=True)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = layer.values.shape
    values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    layer.values = nn.Parameter(values.mul_(layer.values_init.std))
    return layer
