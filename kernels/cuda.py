"""The CUDA implementations of the memcompile ops: the Triton kernels, installed with
`register_kernel("cuda")` so a MemoryLayer on a GPU uses them with no user action.

float64 inputs (used for gradient checks) stay on the PyTorch reference. The backward of
pk_topk is one Triton launch (the sub-key score gradient) and two batched cuBLAS matmuls.
A kernel that cannot be built for the GPU at hand (a compile error, or more shared memory
or registers than it has, as on GPUs smaller than the H100 the shapes were chosen for) is
reported once and its op runs the PyTorch reference from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch

from . import fused_update, ops, reference

log = logging.getLogger(__name__)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ON_REFERENCE: set[str] = set()  # ops whose Triton kernel could not be built here


def _build_errors() -> tuple[type[Exception], ...]:
    """Triton's exceptions for a kernel that cannot be built for this GPU (PTXASError is
    Triton 3.2's; before, ptxas failures were plain RuntimeErrors, not caught)."""
    from triton.compiler import errors as compiler_errors
    from triton.runtime import errors as runtime_errors

    names = (("CompilationError", compiler_errors), ("OutOfResources", runtime_errors),
             ("PTXASError", runtime_errors))  # fmt: skip
    return tuple(getattr(module, name) for name, module in names if hasattr(module, name))


def _triton_or_reference(
    op: str, dtype: torch.dtype, triton_call: Callable, reference_call: Callable
):  # fmt: skip
    """triton_call(), or reference_call() for an op whose kernel cannot be built on this
    GPU for this dtype (remembered for the rest of the process: bf16 may fail where fp32
    builds). The Triton calls build their kernels before they write anything, so a failed
    one has changed nothing."""
    op = f"{op} {str(dtype).removeprefix('torch.')}"
    if op not in _ON_REFERENCE:
        try:
            return triton_call()
        except _build_errors() as error:
            _ON_REFERENCE.add(op)
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "this device"
            # A CompilationError's first line is the source position; its cause is last.
            lines = [line for line in str(error).splitlines() if line.strip()]
            cause = error.__cause__ or (lines[-1] if lines else "")
            log.warning(
                "memcompile: the Triton kernel of %s cannot be built for %s (%s: %s); "
                "%s runs its PyTorch implementation from now on",
                op, device, type(error).__name__, str(cause)[:300], op,
            )  # fmt: skip
    return reference_call()


def take_unbuilt() -> list[str]:
    """The ops (with their dtype) whose Triton kernel could not be built since the last
    call, which then try their kernels again: for checks and benchmarks, where a fallback
    would compare or time the PyTorch reference in the kernel's place."""
    unbuilt = sorted(_ON_REFERENCE)
    _ON_REFERENCE.clear()
    return unbuilt


def _run(op: str, dtype: torch.dtype, usable: bool, triton_fn, reference_fn, *args):
    """triton_fn(*args) where the op's Triton kernel takes these inputs (`usable`) and can
    be built, else reference_fn(*args)."""
    if not usable:
        return reference_fn(*args)
    return _triton_or_reference(op, dtype, partial(triton_fn, *args), partial(reference_fn, *args))


def _triton_dtypes(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.dtype in _TRITON_DTYPES for t in tensors)


def bag_cuda(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    from . import triton_bag

    return _run("bag", values.dtype, _triton_dtypes(values), triton_bag.bag_forward,
                reference.bag, values, indices, weights)  # fmt: skip


def bag_backward_cuda(grad_out, values, indices, weights):
    from . import triton_bag

    return _run("bag_backward", values.dtype, _triton_dtypes(values), triton_bag.bag_backward,
                reference.bag_backward, grad_out, values, indices, weights)  # fmt: skip


def bag_backward_rows_cuda(grad_out, values, indices, weights, rows):
    from . import triton_bag

    return _run("bag_backward", values.dtype, _triton_dtypes(values), triton_bag.bag_backward,
                reference.bag_backward_rows, grad_out, values, indices, weights, rows)  # fmt: skip


def pk_topk_cuda(q: torch.Tensor, keys: torch.Tensor, knn: int):
    from . import triton_topk

    return _run("pk_topk", q.dtype, _triton_topk_applies(q, keys, knn), triton_topk.pk_topk,
                reference.pk_topk, q, keys, knn)  # fmt: skip


def _triton_topk_applies(q: torch.Tensor, keys: torch.Tensor, knn: int) -> bool:
    from . import triton_topk

    # Large knn would need (2**ceil(log2 knn))**2 candidates per token in registers.
    if q.dtype not in _TRITON_DTYPES or keys.shape[2] > 2**16 or knn > 64:
        return False
    return triton_topk.supports(keys.shape[3], knn, q.element_size())


def pk_topk_backward_cuda(grad_scores, q, keys, indices):
    from . import triton_topk_backward

    return _run("pk_topk_backward", q.dtype, _triton_dtypes(q, keys),
                triton_topk_backward.pk_topk_backward, reference.pk_topk_backward, grad_scores,
                q, keys, indices)  # fmt: skip


def silu_gate_cuda(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    from . import triton_gate

    return _run("silu_gate", gate.dtype, _triton_dtypes(x, gate), triton_gate.silu_gate,
                reference.silu_gate, x, gate)  # fmt: skip


def silu_gate_backward_cuda(grad, x, gate):
    from . import triton_gate

    return _run("silu_gate_backward", gate.dtype, _triton_dtypes(x, gate),
                triton_gate.silu_gate_backward, reference.silu_gate_backward, grad, x,
                gate)  # fmt: skip


def pk_lookup_cuda(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, knn: int, swilu=None
) -> torch.Tensor:
    # Host values that are not pinned (or not contiguous: a copy would not be pinned) cannot
    # be read by the GPU: the reference sums them on the host.
    readable = values.device == q.device or (values.is_pinned() and values.is_contiguous())
    usable = _triton_topk_applies(q, keys, knn) and _triton_dtypes(values, swilu) and readable
    return _run("pk_lookup", q.dtype, usable, _triton_lookup, reference.pk_lookup, q, keys,
                values, knn, swilu)  # fmt: skip


def _triton_lookup(q, keys, values, knn, swilu):
    from . import triton_bag, triton_topk

    picks = q.shape[1] * knn
    # Two launches for a decode token's top-k (split scan, merge + softmax), one for the bag
    # and its gating, which gathers host-resident rows over the host link (zero-copy) like
    # device rows.
    probs, indices = triton_topk.pk_topk(q, keys, knn, softmax=True)
    return triton_bag.bag_forward(values, indices.view(-1, picks), probs.view(-1, picks), swilu)


def linears_cuda(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    from . import triton_linear

    same_dtype = all(t is None or t.dtype == x.dtype for t in [*weights, *biases])
    fits = x.dim() == 2 and 1 <= x.shape[1] and x.shape[0] <= triton_linear.MAX_TOKENS
    maps = all(w.dim() == 2 and w.shape[1] == x.shape[-1] and (b is None or b.shape == w.shape[:1])
               for w, b in zip(weights, biases))  # fmt: skip
    usable = fits and maps and same_dtype and _triton_dtypes(x)  # else cuBLAS, for many tokens
    return _run("linears", x.dtype, usable, triton_linear.linears, reference.linears, x,
                weights, biases)  # fmt: skip


def bag_weight_grad_cuda(grad_out, values, indices):
    from . import triton_update

    return _run("bag_weight_grad", values.dtype, True, triton_update.bag_weight_grad,
                fused_update.weight_grad_reference, grad_out, values, indices)  # fmt: skip


def row_grad_sq_cuda(values, indices, weights, grad_out):
    from . import triton_update

    return _run("row_grad_sq", values.dtype, True, triton_update.row_grad_sq,
                fused_update.row_grad_sq_reference, values, indices, weights, grad_out)  # fmt: skip


def fused_row_update_cuda(*args):
    from . import triton_update

    return _run("fused_row_update", args[0].dtype, True, triton_update.fused_row_update,
                fused_update.fused_row_update_reference, *args)  # fmt: skip


def register_cuda_kernels(device_type: str = "cuda") -> bool:
    """Install the Triton kernels for CUDA tensors; False where Triton or CUDA is missing.
    `device_type="cpu"` installs them for CPU tensors instead, for Triton's interpreter
    (TRITON_INTERPRET=1) to run: how benchmarks/rehearsal.py runs a GPU session's code."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.info("triton is not installed: memcompile ops use the PyTorch reference on CUDA")
        return False
    kernels = [
        (ops.bag, bag_cuda), (ops.bag_backward, bag_backward_cuda),
        (ops.bag_backward_rows, bag_backward_rows_cuda), (ops.pk_topk, pk_topk_cuda),
        (ops.pk_topk_backward, pk_topk_backward_cuda), (ops.silu_gate, silu_gate_cuda),
        (ops.silu_gate_backward, silu_gate_backward_cuda), (ops.pk_lookup, pk_lookup_cuda),
        (ops.linears, linears_cuda), (fused_update.bag_weight_grad, bag_weight_grad_cuda),
        (fused_update.row_grad_sq, row_grad_sq_cuda),
        (fused_update.fused_row_update, fused_row_update_cuda),
    ]  # fmt: skip
    for op, kernel in kernels:
        op.register_kernel(device_type)(kernel)
    return True
