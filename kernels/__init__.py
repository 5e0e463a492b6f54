"""The memory-layer ops: `memcompile::pk_topk`, `memcompile::bag` and, for inference,
`memcompile::pk_lookup` (both in one) and `memcompile::linears` (the layer's projections).

Plain PyTorch on every device; the Triton kernels on CUDA when Triton is installed; C++
kernels on the CPU (`cpu.py`: pk_lookup's, pk_topk's and bag_backward's, and a memory
layer's whole forward for a few tokens; built on first use where there is a compiler).
"""

if __name__ != "memcompile.kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path (`python -m
    # pytest` or `python -c` there) and something probed that name (transformers imports
    # `kernels` to look for the HF package of that name). Stay an empty package: running
    # ops.py a second time would define the memcompile ops again, and torch frees the
    # registered ones while memcompile still calls them (a crash, or "vector::reserve").
    __all__: list[str] = []
else:
    from . import fused_update  # noqa: F401  (defines the fused value-update ops)
    from .cpu import register_cpu_kernels
    from .cuda import register_cuda_kernels
    from .ops import bag, pk_lookup, pk_topk

    CUDA_KERNELS = register_cuda_kernels()  # the ops and the fused updates
    CPU_KERNELS = register_cpu_kernels()  # pk_lookup

    __all__ = ["CPU_KERNELS", "CUDA_KERNELS", "bag", "pk_lookup", "pk_topk"]
