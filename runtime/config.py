"""`MemoryConfig`: what a memory layer looks like, and how its size is parsed."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace

import torch

from .errors import MemcompileError, is_integer

_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)\s*$", re.IGNORECASE)
_NEGATIVE_SIZE_RE = re.compile(r"^\s*-\s*\d+\s*[KMG]?\s*$", re.IGNORECASE)
# The fewest bytes a sub-key value takes (bfloat16, float16), for a block of unknown dtype.
_MIN_ITEMSIZE = 2
# A tensor's element count is an int64: a value table must stay below it, even unbuilt.
_MAX_ELEMENTS = 2**63 - 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _format_size(n: int) -> str:
    for suffix in ("G", "M", "K"):
        if n % _SUFFIXES[suffix] == 0:
            return f"{n // _SUFFIXES[suffix]}{suffix}"
    return str(n)


def human_bytes(n: float) -> str:
    """`n` bytes in binary units, e.g. "1.5 GiB"; a zebibyte of values is still a number."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} YiB"


def host_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None
    return total if total > 0 else None


def _nearest_squares(n: int) -> str:
    """The perfect squares just below and just above n (n itself not a square)."""
    root = math.isqrt(n)
    options = [s for s in (root**2, (root + 1) ** 2) if s >= 1]
    return " or ".join(f"{_format_size(s)} (= {math.isqrt(s)}**2)" for s in options)


def parse_mem_size(mem_size: int | str) -> int:
    """Number of value rows: an int or a string with a K/M/G suffix ("64K" = 256**2)."""
    if is_integer(mem_size):
        n = int(mem_size)
    elif isinstance(mem_size, str):
        match = _SIZE_RE.match(mem_size)
        if match is None and _NEGATIVE_SIZE_RE.match(mem_size):
            raise MemcompileError(
                f"mem_size must be positive (a number of value rows), got {mem_size!r}"
            )
        if match is None:
            raise MemcompileError(
                f"mem_size {mem_size!r} is not a size: write an integer or a number with a "
                "K/M/G suffix, e.g. '64K' (256**2 rows) or '1M' (1024**2 rows)"
            )
        n = int(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    else:
        raise MemcompileError(f"mem_size must be an int or a string like '1M', got {mem_size!r}")
    if n < 1:
        raise MemcompileError(f"mem_size must be positive, got {mem_size!r}")
    root = math.isqrt(n)
    if root**2 != n:
        memory = host_memory()
        # Even at heads=1 and k_dim=2 in 2-byte values, n_keys sub-keys of 2 halves take
        # 4 bytes each: a size past that is no typo one square away.
        if memory is not None and 2 * root * _MIN_ITEMSIZE > memory:
            raise MemcompileError(
                f"mem_size {mem_size!r} ({n} rows) is not a perfect square, and far too "
                f"large: the sub-keys of its {root:,} keys alone, 4 bytes a key or more, need "
                f"more than the {human_bytes(memory)} of memory here: choose a much smaller "
                "mem_size, e.g. '1M' (1024**2 rows) or '16M' (4096**2)"
            )
        raise MemcompileError(
            f"mem_size {mem_size!r} ({n} rows) is not a perfect square (product keys index "
            f"n_keys**2 rows); nearest valid sizes: {_nearest_squares(n)}"
        )
    return n


@dataclass(frozen=True)
class MemoryConfig:
    """How to build a product-key memory layer (see DESIGN.md, "The memory layer").

    `k_dim` and `v_dim` default to min(512, d_model) and d_model of the block converted;
    `dtype` defaults to the dtype of the weights of the block converted.
    """

    mem_size: int | str = "1M"
    heads: int = 4
    knn: int = 32
    k_dim: int | None = None
    v_dim: int | None = None
    gating: str = "swilu"
    qk_norm: bool = False
    share_values: bool = True
    mode: str = "replace"
    seed: int = 0
    dtype: str | torch.dtype | None = None  # stored as its name, e.g. "bfloat16"

    def __post_init__(self) -> None:
        for name in ("mem_size", "heads", "knn", "k_dim", "v_dim", "seed"):
            value = getattr(self, name)  # numpy and torch integers count as ints
            if is_integer(value):
                object.__setattr__(self, name, int(value))
        for name in ("qk_norm", "share_values"):
            if not isinstance(getattr(self, name), bool):
                raise MemcompileError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_integer(self.seed):
            raise MemcompileError(f"seed must be an integer, got {self.seed!r}")
        if not -(2**63) <= self.seed < 2**63:  # seeds are used mod 2**64: no two may collide
            raise MemcompileError(f"seed must fit in 64 bits (a signed int64), got {self.seed}")
        n = parse_mem_size(self.mem_size)
        object.__setattr__(self, "mem_size", n)
        if not is_integer(self.heads) or self.heads < 1:
            raise MemcompileError(f"heads must be an integer >= 1, got {self.heads!r}")
        n_keys = math.isqrt(n)
        if not is_integer(self.knn) or self.knn < 1:
            raise MemcompileError(f"knn must be an integer >= 1, got {self.knn!r}")
        if self.knn > n_keys:
            raise MemcompileError(
                f"knn={self.knn} is larger than n_keys={n_keys} (mem_size {_format_size(n)}): "
                f"use knn <= {n_keys} or a mem_size of at least "
                f"{_format_size(self.knn**2)} (= {self.knn}**2)"
            )
        for name in ("k_dim", "v_dim"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 1):
                raise MemcompileError(f"{name} must be a positive integer, got {value!r}")
        if self.k_dim is not None and self.k_dim % 2:
            raise MemcompileError(
                f"k_dim must be even (each query is split into two halves), got {self.k_dim}"
            )
        if self.gating not in ("swilu", "none"):
            raise MemcompileError(f"gating must be 'swilu' or 'none', got {self.gating!r}")
        if self.mode not in ("replace", "augment"):
            raise MemcompileError(f"mode must be 'replace' or 'augment', got {self.mode!r}")
        if isinstance(self.dtype, torch.dtype):  # torch.bfloat16 as well as "bfloat16"
            names = {dtype: name for name, dtype in _DTYPES.items()}
            object.__setattr__(self, "dtype", names.get(self.dtype, str(self.dtype)))
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise MemcompileError(
                f"dtype must be one of {', '.join(_DTYPES)} (or None for the model's), "
                f"got {self.dtype!r}"
            )

    @property
    def n_keys(self) -> int:
        return math.isqrt(self.mem_size)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    def resolve(self, d_model: int, d_out: int | None = None) -> MemoryConfig:
        """The config with k_dim and v_dim filled in for a block of width d_model."""
        d_out = d_model if d_out is None else d_out
        k_dim = self.k_dim if self.k_dim is not None else min(512, d_model)
        k_dim += k_dim % 2
        v_dim = self.v_dim if self.v_dim is not None else d_model
        if self.gating == "none" and v_dim != d_out:
            raise MemcompileError(
                f"gating 'none' needs v_dim == d_out ({d_out}), got v_dim={v_dim}: "
                "drop v_dim or use gating='swilu'"
            )
        resolved = replace(self, k_dim=k_dim, v_dim=v_dim)
        resolved._check_buildable()
        return resolved

    def _check_buildable(self) -> None:
        """Refuse a memory whose sub-keys alone exceed this machine's memory (they are built
        eagerly, lazy_init or not), or whose value table no tensor can describe, even an
        unbuilt one: the allocator's failure later would name no option to change."""
        n_keys, k_dim, v_dim = self.n_keys, self.k_dim, self.v_dim
        assert k_dim is not None and v_dim is not None  # resolved
        itemsize = self.torch_dtype.itemsize if self.torch_dtype else _MIN_ITEMSIZE
        keys = self.heads * 2 * n_keys * (k_dim // 2) * itemsize
        memory = host_memory()
        if memory is not None and keys > memory:
            least = "" if self.torch_dtype else "at least "
            raise MemcompileError(
                f"mem_size {self.mem_size:,} (= {n_keys:,}**2) is too large: its sub-keys "
                f"alone (heads {self.heads} x 2 halves x {n_keys:,} keys x {k_dim // 2} "
                f"= k_dim/2) need {least}{human_bytes(keys)}, more than the "
                f"{human_bytes(memory)} of memory here: choose a smaller mem_size"
            )
        if self.mem_size * v_dim > _MAX_ELEMENTS:
            raise MemcompileError(
                f"mem_size {self.mem_size:,} x v_dim {v_dim} is a value table of "
                f"{self.mem_size * v_dim:.3g} entries, more than a tensor can hold (2**63): "
                "choose a smaller mem_size"
            )

    def to_dict(self) -> dict:
        return asdict(self)
