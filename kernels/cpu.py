"""The C++ CPU kernel of `memcompile::pk_lookup`, a memory layer's inference lookup, for
a few tokens (decoding).

The plain-PyTorch lookup is a dozen small ops, each with Python and dispatch overhead
(several microseconds apiece on a small CPU). Here the score matmul and each half's top-k
stay torch ops (on torch's threads); the product-key candidates, the softmax, the bag and
the Memory+ gating are one call into `cpu_kernels.cc` (`memcompile_lookup`), which reads
each picked row once. More tokens, other dtypes and malformed inputs run the reference.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from . import native, ops, reference

log = logging.getLogger(__name__)

# Tokens up to which a lookup runs in the C++ kernel. Its bag reads each token's rows on one
# thread, the reference's on all of torch's: on 2 cores (d_model 1024, 512^2 values, knn 32,
# 4 heads) the kernel took 0.66x the reference's time at 1 token, 0.93x at 4, 1.01x at 8.
MAX_TOKENS = 4

_ARGTYPES = (
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
    ctypes.c_void_p,
)  # fmt: skip
_lookup = None  # the C function, once the library is loaded; False where it cannot be


def _native_lookup():
    global _lookup
    if _lookup is None:
        library = native.loaded()
        if library is None:
            log.info("memcompile::pk_lookup runs its PyTorch reference on the CPU")
            _lookup = False
        else:
            try:
                function = library.memcompile_lookup
            except AttributeError:  # a library from an older source under the same name
                log.warning("memcompile's C++ CPU kernels lack memcompile_lookup: PyTorch runs")
                _lookup = False
                return _lookup
            function.argtypes, function.restype = _ARGTYPES, None
            _lookup = function  # published once callable: another thread may read it now
    return _lookup


def _fits(q, keys, values, knn, swilu) -> bool:
    """Whether the C++ kernel takes these inputs: up to MAX_TOKENS float32 tokens, float32
    keys that match them, a contiguous float32 or float16 table of n_keys**2 rows and a
    float32 gate of the bag's shape, all on the CPU. Anything else (and malformed input,
    which the reference rejects) runs the reference."""
    if q.dim() != 3 or keys.dim() != 4 or values.dim() != 2:
        return False
    n, heads, k_dim = q.shape
    n_keys = keys.shape[2]
    return (
        1 <= n <= MAX_TOKENS
        and 1 <= knn <= n_keys
        and tuple(keys.shape) == (heads, 2, n_keys, k_dim // 2)
        and k_dim % 2 == 0
        and q.dtype == keys.dtype == torch.float32
        and values.dtype in (torch.float32, torch.float16)
        and values.shape[0] == n_keys * n_keys
        and values.is_contiguous()
        and values.device.type == "cpu"
        and (
            swilu is None
            or (
                swilu.dtype == torch.float32
                and swilu.device.type == "cpu"
                and tuple(swilu.shape) == (n, values.shape[1])
            )
        )
    )


def pk_lookup_cpu(q, keys, values, knn, swilu=None):
    if not _fits(q, keys, values, knn, swilu) or not _native_lookup():
        return reference.pk_lookup(q, keys, values, knn, swilu)
    n, heads = q.shape[:2]
    best, best_ids = reference.half_scores(q, keys).topk(knn, dim=-1)
    best, best_ids = best.contiguous(), best_ids.contiguous()
    gate = None if swilu is None else swilu.contiguous()
    out = torch.empty(n, values.shape[1], dtype=torch.float32, device="cpu")
    _lookup(
        best.data_ptr(), best_ids.data_ptr(), n, heads, keys.shape[2], knn, values.data_ptr(),
        int(values.dtype == torch.float16), values.shape[1],
        None if gate is None else gate.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out if swilu is not None else out.to(values.dtype)


def register_cpu_kernels() -> bool:
    """Install the C++ kernel of pk_lookup for CPU tensors (the library is built at its
    first call); False where no C++ compiler is found."""
    if native._compiler() is None:
        log.info("no C++ compiler: memcompile::pk_lookup runs its PyTorch reference on the CPU")
        return False
    ops.pk_lookup.register_kernel("cpu")(pk_lookup_cpu)
    return True
