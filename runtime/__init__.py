"""What runs: the memory layer, its config, and the error type."""

if __name__ != "memcompile.runtime":  # the repository root is on sys.path: see kernels/__init__.py
    raise ImportError(f"{__file__} is memcompile.runtime: import memcompile, not runtime")

from .config import MemoryConfig, parse_mem_size
from .dist_checkpoint import full_state_dict, load_distributed, save_distributed
from .distributed import PlanMismatchError, apply_plan, init_distributed
from .errors import MemcompileError
from .init import ValuesInit, materialize_values, offload_values
from .memory_layer import MemoryLayer, MemoryPool
from .ort import ort_session
from .plan import (
    BandwidthModel,
    Mesh,
    Plan,
    load_plan,
    model_fingerprint,
    parse_bytes,
    save_plan,
)
from .sharded_bag import CollectiveError, ShardedBag

__all__ = [
    "CollectiveError",
    "PlanMismatchError",
    "ShardedBag",
    "apply_plan",
    "full_state_dict",
    "init_distributed",
    "load_distributed",
    "save_distributed",
    "BandwidthModel",
    "Mesh",
    "Plan",
    "load_plan",
    "model_fingerprint",
    "parse_bytes",
    "save_plan",
    "MemcompileError",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryPool",
    "ValuesInit",
    "materialize_values",
    "offload_values",
    "ort_session",
    "parse_mem_size",
]
