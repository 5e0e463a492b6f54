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


def bag_cuda(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    from . import triton_bag

    args = (values, indices, weights)
    if values.dtype not in _TRITON_DTYPES:
        return reference.bag(*args)
    return _triton_or_reference(
        "bag", values.dtype, partial(triton_bag.bag_forward, *args), partial(reference.bag, *args)
    )


def bag_backward_cuda(grad_out, values, indices, weights):
    from . import triton_bag

    args = (grad_out, values, indices, weights)
    if values.dtype not in _TRITON_DTYPES:
        return reference.bag_backward(*args)
    return _triton_or_reference(
        "bag_backward",
        values.dtype,
        partial(triton_bag.bag_backward, *args),
        partial(reference.bag_backward, *args),
    )


def pk_topk_cuda(q: torch.Tensor, keys: torch.Tensor, knn: int):
    from . import triton_topk

    if not _triton_topk_applies(q, keys, knn):
        return reference.pk_topk(q, keys, knn)
    return _triton_or_reference(
        "pk_topk",
        q.dtype,
        partial(triton_topk.pk_topk, q, keys, knn),
        partial(reference.pk_topk, q, keys, knn),
    )


def _triton_topk_applies(q: torch.Tensor, keys: torch.Tensor, knn: int) -> bool:
    from . import triton_topk

    # Large knn would need (2**ceil(log2 knn))**2 candidates per token in registers.
    if q.dtype not in _TRITON_DTYPES or keys.shape[2] > 2**16 or knn > 64:
        return False
    return triton_topk.supports(keys.shape[3], knn, q.element_size())


def pk_topk_backward_cuda(grad_scores, q, keys, indices):
    from . import triton_topk_backward

    args = (grad_scores, q, keys, indices)
    if q.dtype not in _TRITON_DTYPES or keys.dtype not in _TRITON_DTYPES:
        return reference.pk_topk_backward(*args)
    return _triton_or_reference(
        "pk_topk_backward", q.dtype, partial(triton_topk_backward.pk_topk_backward, *args),
        partial(reference.pk_topk_backward, *args),
    )  # fmt: skip


def silu_gate_cuda(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    from . import triton_gate

    if x.dtype not in _TRITON_DTYPES or gate.dtype not in _TRITON_DTYPES:
        return reference.silu_gate(x, gate)
    return _triton_or_reference(
        "silu_gate", gate.dtype, partial(triton_gate.silu_gate, x, gate),
        partial(reference.silu_gate, x, gate),
    )  # fmt: skip


def silu_gate_backward_cuda(grad, x, gate):
    from . import triton_gate

    args = (grad, x, gate)
    if x.dtype not in _TRITON_DTYPES or gate.dtype not in _TRITON_DTYPES:
        return reference.silu_gate_backward(*args)
    return _triton_or_reference(
        "silu_gate_backward", gate.dtype, partial(triton_gate.silu_gate_backward, *args),
        partial(reference.silu_gate_backward, *args),
    )  # fmt: skip


def pk_lookup_cuda(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, knn: int, swilu=None
) -> torch.Tensor:
    args = (q, keys, values, knn, swilu)
    # Host values that are not pinned (or not contiguous: a copy would not be pinned) cannot
    # be read by the GPU: the reference sums them on the host.
    readable = values.device == q.device or (values.is_pinned() and values.is_contiguous())
    gate_ok = swilu is None or swilu.dtype in _TRITON_DTYPES
    usable = _triton_topk_applies(q, keys, knn) and values.dtype in _TRITON_DTYPES
    if not (usable and readable and gate_ok):
        return reference.pk_lookup(*args)
    return _triton_or_reference(
        "pk_lookup", q.dtype, partial(_triton_lookup, *args), partial(reference.pk_lookup, *args)
    )


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

    args = (x, weights, biases)
    same_dtype = all(t is None or t.dtype == x.dtype for t in [*weights, *biases])
    fits = x.dim() == 2 and 1 <= x.shape[1] and x.shape[0] <= triton_linear.MAX_TOKENS
    maps = all(w.dim() == 2 and w.shape[1] == x.shape[-1] and (b is None or b.shape == w.shape[:1])
               for w, b in zip(weights, biases))  # fmt: skip
    if not (fits and maps and same_dtype and x.dtype in _TRITON_DTYPES):
        return reference.linears(*args)  # cuBLAS, for many tokens
    return _triton_or_reference(
        "linears", x.dtype, partial(triton_linear.linears, *args),
        partial(reference.linears, *args),
    )  # fmt: skip


def bag_weight_grad_cuda(grad_out, values, indices):
    from . import triton_update

    args = (grad_out, values, indices)
    return _triton_or_reference(
        "bag_weight_grad",
        values.dtype,
        partial(triton_update.bag_weight_grad, *args),
        partial(fused_update.weight_grad_reference, *args),
    )


def row_grad_sq_cuda(values, indices, weights, grad_out):
    from . import triton_update

    args = (values, indices, weights, grad_out)
    return _triton_or_reference(
        "row_grad_sq",
        values.dtype,
        partial(triton_update.row_grad_sq, *args),
        partial(fused_update.row_grad_sq_reference, *args),
    )


def fused_row_update_cuda(*args):
    from . import triton_update

    return _triton_or_reference(
        "fused_row_update", args[0].dtype, partial(triton_update.fused_row_update, *args),
        partial(fused_update.fused_row_update_reference, *args),
    )  # fmt: skip


def register_cuda_kernels() -> bool:
    """Install the Triton kernels for CUDA tensors; False where Triton or CUDA is missing."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.info("triton is not installed: memcompile ops use the PyTorch reference on CUDA")
        return False
    ops.bag.register_kernel("cuda")(bag_cuda)
    ops.bag_backward.register_kernel("cuda")(bag_backward_cuda)
    ops.pk_topk.register_kernel("cuda")(pk_topk_cuda)
    ops.pk_topk_backward.register_kernel("cuda")(pk_topk_backward_cuda)
    ops.silu_gate.register_kernel("cuda")(silu_gate_cuda)
    ops.silu_gate_backward.register_kernel("cuda")(silu_gate_backward_cuda)
    ops.pk_lookup.register_kernel("cuda")(pk_lookup_cuda)
    ops.linears.register_kernel("cuda")(linears_cuda)
    fused_update.bag_weight_grad.register_kernel("cuda")(bag_weight_grad_cuda)
    fused_update.row_grad_sq.register_kernel("cuda")(row_grad_sq_cuda)
    fused_update.fused_row_update.register_kernel("cuda")(fused_row_update_cuda)
    return True
