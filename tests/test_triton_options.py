"""Every Triton kernel launch states its compile options (kernels/triton_options.py), so a
Triton upgrade that changes a default (3.10 turns floating-point contraction off) does not
change the kernels' rounding and speed unannounced."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

import memcompile.kernels
from memcompile.kernels.triton_options import COMPILE_OPTIONS

KERNELS = Path(memcompile.kernels.__file__).parent


def _jit_functions(tree: ast.Module) -> set[str]:
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).startswith("triton.jit") for d in node.decorator_list)
    }


def _launches(path: Path) -> list[ast.Call]:
    """Calls of the form kernel[grid](...) of the module's own triton.jit functions."""
    tree = ast.parse(path.read_text())
    jitted = _jit_functions(tree)
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in jitted
    ]


def test_every_kernel_launch_passes_the_compile_options():
    launches = {path.name: _launches(path) for path in sorted(KERNELS.glob("triton_*.py"))}
    assert sum(map(len, launches.values())) >= 12  # the finder finds the launches
    missing = [
        f"{name}:{call.lineno}"
        for name, calls in launches.items()
        for call in calls
        if not any(k.arg is None and ast.unparse(k.value) == "COMPILE_OPTIONS" for k in
                   call.keywords)  # fmt: skip
    ]
    assert not missing, f"launches without **COMPILE_OPTIONS: {missing}"


def test_the_cuda_backend_takes_the_options_without_its_default_warning():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        pytest.skip("this Triton has no CUDA backend to ask")
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        options = backend.parse_options({**COMPILE_OPTIONS, "num_warps": 4})
    assert options.enable_fp_fusion is True
