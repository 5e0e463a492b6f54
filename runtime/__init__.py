"""What runs: the memory layer, its config, and the error type."""

from .config import MemoryConfig, parse_mem_size
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

__all__ = [
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
