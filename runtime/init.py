"""Deterministic, chunkable initialisation of memory tables.

Rows are drawn in fixed blocks, each from a CPU generator seeded by (seed, block), so the
table is the same whatever chunk of rows is materialised at a time and whatever device it
lands on. That lets a very large table be built chunk by chunk on its final device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import MemcompileError, is_integer

ROWS_PER_BLOCK = 4096
# Tag of the shared pool's stream (a layer's own streams derive from its block's path).
POOL_SEED_TAG = 1 << 20
_MIX = 0x9E3779B97F4A7C15


def derive_seed(seed: int, *tags: int) -> int:
    """A seed for a sub-stream (a layer, a block of rows) that differs for every tag tuple."""
    state = seed & (2**64 - 1)
    for tag in tags:
        state = ((state ^ (tag + 1)) * _MIX) & (2**64 - 1)
        state ^= state >> 31
    return state & (2**63 - 1)


def normal_rows_(table: torch.Tensor, std: float, seed: int, row_offset: int = 0) -> torch.Tensor:
    """Fill `table` (rows, width) with N(0, std**2) rows row_offset.. of the seeded stream."""
    n_rows, width = table.shape
    first_block = row_offset // ROWS_PER_BLOCK
    last_block = (row_offset + n_rows - 1) // ROWS_PER_BLOCK
    for block in range(first_block, last_block + 1):
        generator = torch.Generator().manual_seed(derive_seed(seed, block))
        rows = torch.randn(ROWS_PER_BLOCK, width, generator=generator).mul_(std)
        lo = max(row_offset, block * ROWS_PER_BLOCK)
        hi = min(row_offset + n_rows, (block + 1) * ROWS_PER_BLOCK)
        base = block * ROWS_PER_BLOCK
        with torch.no_grad():
            table[lo - row_offset : hi - row_offset].copy_(rows[lo - base : hi - base])
    return table


def uniform_(tensor: torch.Tensor, bound: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rand = torch.rand(tensor.shape, generator=generator, dtype=torch.float32)
        tensor.copy_(rand.mul_(2 * bound).sub_(bound))
    return tensor


def normal_(tensor: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=generator).mul_(std))
    return tensor


@dataclass(frozen=True)
class ValuesInit:
    """The init recipe of a value table: N(0, std**2) rows of the stream `seed`.

    A table created lazily lives on the meta device until `materialize` builds it, chunk by
    chunk, on its final device; the result does not depend on the chunk size or the device.
    """

    std: float
    seed: int

    def materialize(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        chunk_rows: int = 16 * ROWS_PER_BLOCK,
    ) -> torch.Tensor:
        try:
            table = torch.empty(shape, dtype=dtype, device=device)
        except RuntimeError as error:  # the allocators' "can't allocate" / "out of memory"
            if "allocat" not in str(error) and "out of memory" not in str(error):
                raise
            size = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size() / 2**30
            raise MemcompileError(
                f"the value table ({shape[0]:,} x {shape[1]}, {size:,.1f} GiB) does not fit in "
                "memory here: build it where it fits, or choose a smaller mem_size"
            ) from None
        for start in range(0, shape[0], chunk_rows):
            normal_rows_(table[start : start + chunk_rows], self.std, self.seed, row_offset=start)
        return table

    def new_table(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        lazy: bool = False,
    ) -> nn.Parameter:
        if lazy:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
        try:
            return nn.Parameter(self.materialize(shape, dtype, device))
        except MemcompileError as error:  # at transform: the recipe alone can be stored
            raise MemcompileError(
                f"{error}; or pass lazy_init=True (--lazy-init) to store its init recipe "
                "instead of its bytes"
            ) from None


def materialize_values(
    model: nn.Module,
    device: torch.device | str | None = None,
    chunk_rows: int = 16 * ROWS_PER_BLOCK,
) -> int:
    """Build every lazily created value table of `model` from its init recipe.

    Tables land on `device` (default: the device of the module's other parameters, else
    the model's, else CPU: a shared pool holds nothing but its table). Returns how many
    tables were built.
    """
    if not is_integer(chunk_rows) or chunk_rows < 1:
        raise MemcompileError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    model_devices = [p.device for p in model.parameters() if not p.is_meta]
    built = 0
    for module in model.modules():
        recipe = getattr(module, "values_init", None)
        values = module._parameters.get("values")
        if recipe is None or values is None or not values.is_meta:
            continue
        target = device
        if target is None:
            others = [p.device for p in module.parameters() if not p.is_meta] + model_devices
            target = others[0] if others else "cpu"
        table = recipe.materialize(tuple(values.shape), values.dtype, target, chunk_rows)
        module.values = nn.Parameter(table, requires_grad=values.requires_grad)
        built += 1
    return built


def offload_values(model: nn.Module, pin: bool = True) -> int:
    """Move every value table of `model` to host memory (pinned when CUDA is there and
    `pin`), leaving the rest where it is: a memory larger than the GPU still serves. In
    inference on CUDA the bag kernel reads the picked rows straight from pinned memory
    (only they cross the host link, no host synchronisation); otherwise each lookup sums
    its rows on the host. Call it after `model.to(device)`, which would move the tables
    back. Returns how many tables moved."""
    if any(v.is_meta for m in model.modules() if (v := m._parameters.get("values")) is not None):
        raise MemcompileError(
            "the model's value tables are not built yet (lazy init): call "
            "memcompile.runtime.materialize_values(model) before offload_values"
        )
    moved = 0
    for module in model.modules():
        values = module._parameters.get("values")
        if values is None:
            continue
        host = values.detach().to("cpu")
        if pin and torch.cuda.is_available():
            host = host.pin_memory()
        module.values = nn.Parameter(host, requires_grad=values.requires_grad)
        moved += 1
    return moved
