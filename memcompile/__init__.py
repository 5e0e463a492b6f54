"""memcompile: compile the FFN blocks of PyTorch models into product-key memory layers."""

from .api import TransformReport, count_parameters, find_ffn_blocks, transform
from .checkpoint import load, save
from .passes import FFNBlock
from .runtime import MemcompileError, MemoryConfig, MemoryLayer, MemoryPool

__all__ = [
    "FFNBlock",
    "MemcompileError",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryPool",
    "TransformReport",
    "count_parameters",
    "find_ffn_blocks",
    "load",
    "save",
    "transform",
]
__version__ = "0.1.0"
