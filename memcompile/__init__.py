"""memcompile: compile the FFN blocks of PyTorch models into product-key memory layers."""

from .api import TransformReport, count_parameters, find_ffn_blocks, transform
from .calibrate import CalibrationReport, LayerCalibration, calibrate
from .checkpoint import load, save
from .onnx_export import export_onnx
from .passes import FFNBlock
from .planning import plan
from .runtime import MemcompileError, MemoryConfig, MemoryLayer, MemoryPool
from .training import fuse_value_updates, memory_values, param_groups, sparse_value_grads

__all__ = [
    "CalibrationReport",
    "FFNBlock",
    "LayerCalibration",
    "MemcompileError",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryPool",
    "TransformReport",
    "calibrate",
    "count_parameters",
    "export_onnx",
    "find_ffn_blocks",
    "fuse_value_updates",
    "load",
    "memory_values",
    "param_groups",
    "plan",
    "save",
    "sparse_value_grads",
    "transform",
]
__version__ = "0.1.0"
