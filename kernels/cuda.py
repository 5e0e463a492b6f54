"""The CUDA implementations of the memcompile ops: the Triton kernels, installed with
`register_kernel("cuda")` so a MemoryLayer on a GPU uses them with no user action.

float64 inputs (used for gradient checks) stay on the PyTorch reference. The backward of
pk_topk stays on the reference too: a dense sub-key score gradient and four matrix
products, which cuBLAS runs near its peak.
"""

from __future__ import annotations

import logging

import torch

from . import ops, reference

log = logging.getLogger(__name__)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bag_cuda(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    from . import triton_bag

    if values.dtype not in _TRITON_DTYPES:
        return reference.bag(values, indices, weights)
    return triton_bag.bag_forward(values, indices, weights)


def bag_backward_cuda(grad_out, values, indices, weights):
    from . import triton_bag

    if values.dtype not in _TRITON_DTYPES:
        return reference.bag_backward(grad_out, values, indices, weights)
    return triton_bag.bag_backward(grad_out, values, indices, weights)


def pk_topk_cuda(q: torch.Tensor, keys: torch.Tensor, knn: int):
    from . import triton_topk

    if not _triton_topk_applies(q, keys, knn):
        return reference.pk_topk(q, keys, knn)
    return triton_topk.pk_topk(q, keys, knn)


def _triton_topk_applies(q: torch.Tensor, keys: torch.Tensor, knn: int) -> bool:
    from . import triton_topk

    # Large knn would need (2**ceil(log2 knn))**2 candidates per token in registers.
    if q.dtype not in _TRITON_DTYPES or keys.shape[2] > 2**16 or knn > 64:
        return False
    return triton_topk.supports(keys.shape[3], knn, q.element_size())


def pk_lookup_cuda(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, knn: int):
    from . import triton_bag, triton_topk

    # Host values that are not pinned (or not contiguous: a copy would not be pinned) cannot
    # be read by the GPU: the reference sums them on the host.
    readable = values.device == q.device or (values.is_pinned() and values.is_contiguous())
    if not (_triton_topk_applies(q, keys, knn) and values.dtype in _TRITON_DTYPES and readable):
        return reference.pk_lookup(q, keys, values, knn)
    picks = q.shape[1] * knn
    # Two launches for a decode token's top-k (split scan, merge + softmax), one for the bag,
    # which gathers host-resident rows over the host link (zero-copy) like device rows.
    probs, indices = triton_topk.pk_topk(q, keys, knn, softmax=True)
    return triton_bag.bag_forward(values, indices.view(-1, picks), probs.view(-1, picks))


def register_cuda_kernels() -> bool:
    """Install the Triton kernels for CUDA tensors; False where Triton or CUDA is missing."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.info("triton is not installed: memcompile ops use the PyTorch reference on CUDA")
        return False
    from . import fused_update, triton_update

    ops.bag.register_kernel("cuda")(bag_cuda)
    ops.bag_backward.register_kernel("cuda")(bag_backward_cuda)
    ops.pk_topk.register_kernel("cuda")(pk_topk_cuda)
    ops.pk_lookup.register_kernel("cuda")(pk_lookup_cuda)
    fused_update.bag_weight_grad.register_kernel("cuda")(triton_update.bag_weight_grad)
    fused_update.row_grad_sq.register_kernel("cuda")(triton_update.row_grad_sq)
    fused_update.fused_row_update.register_kernel("cuda")(triton_update.fused_row_update)
    return True
