"""Compile options that every memcompile Triton kernel launches with.

Floating-point contraction (a * b + c as one fused multiply-add) is on, as the kernels were
checked against float64 and timed with it (benchmarks/GPU_NOTES.md, Triton 3.6). Triton 3.9
warns at each kernel's compile where a launch leaves this to its default, and Triton 3.10
turns the default off: an upgrade would otherwise change the kernels' rounding and speed
unannounced.
"""

COMPILE_OPTIONS = {"enable_fp_fusion": True}
