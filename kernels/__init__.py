"""The memory-layer ops: `memcompile::pk_topk` and `memcompile::bag`.

Plain PyTorch on every device; the Triton kernels on CUDA when Triton is installed.
"""

from . import fused_update
from .cuda import register_cuda_kernels
from .ops import bag, pk_topk

CUDA_KERNELS = register_cuda_kernels()
fused_update.register_cuda_kernels()  # the fused value updates (triton_update.py)

__all__ = ["CUDA_KERNELS", "bag", "pk_topk"]
