"""The C++ CPU kernel of `memcompile::pk_lookup`, a memory layer's inference lookup.

The score matmul and each half's top-k stay torch ops (on torch's threads). The rest is
`cpu_kernels.cc`:
- up to MAX_TOKENS tokens (decoding), one call (`memcompile_lookup`) sums the product keys,
  takes the softmax, reads each picked row once and applies the Memory+ gating, where the
  plain-PyTorch lookup makes a dozen small ops (several microseconds apiece of Python and
  dispatch on a small CPU);
- for more tokens, `memcompile_select` picks the product keys (about k ln k sums a token
  and head, where the reference builds k x k candidate tensors: 192 MB at 4096 tokens) and
  torch's threads sum the bag.
Other dtypes and malformed inputs run the reference.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from . import native, ops, reference

log = logging.getLogger(__name__)

# Tokens up to which the C++ kernel also sums the bag, on one thread; for more, torch's
# threads sum it. On 2 cores (d_model 1024, 512^2 values, knn 32, 4 heads) the one-thread
# bag took 0.66x the reference lookup's time at 1 token, 0.93x at 4, 1.01x at 8.
MAX_TOKENS = 4

_ARGTYPES = (
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
    ctypes.c_void_p,
)  # fmt: skip
_SELECT_ARGTYPES = (
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip
# The C functions (memcompile_lookup, memcompile_select) once the library is loaded; False
# where it cannot be.
_lookup = _select = None


def _native_lookup():
    global _lookup, _select
    if _lookup is None:
        library = native.loaded()
        if library is None:
            log.info("memcompile::pk_lookup runs its PyTorch reference on the CPU")
            _lookup = False
            return _lookup
        try:
            lookup, select = library.memcompile_lookup, library.memcompile_select
        except AttributeError:  # a library from an older source under the same name
            log.warning("memcompile's C++ CPU kernels lack memcompile_lookup: PyTorch runs")
            _lookup = False
            return _lookup
        lookup.argtypes, lookup.restype = _ARGTYPES, None
        select.argtypes, select.restype = _SELECT_ARGTYPES, None
        _select = select
        _lookup = lookup  # published once both are callable: another thread may read it now
    return _lookup


def _fits(q, keys, values, knn, swilu) -> bool:
    """Whether the C++ kernel takes these inputs: float32 tokens, float32 keys that match
    them, a contiguous float32 or float16 table of n_keys**2 rows and a float32 gate of
    the bag's shape, all on the CPU. Anything else (and malformed input, which the
    reference rejects) runs the reference."""
    if q.dim() != 3 or keys.dim() != 4 or values.dim() != 2:
        return False
    n, heads, k_dim = q.shape
    n_keys = keys.shape[2]
    return (
        n >= 1
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
    if n > MAX_TOKENS:  # the products here, the bag on torch's threads
        rows = torch.empty(n, heads * knn, dtype=torch.int64, device="cpu")
        weights = torch.empty(n, heads * knn, dtype=torch.float32, device="cpu")
        _select(best.data_ptr(), best_ids.data_ptr(), n, heads, keys.shape[2], knn,
                rows.data_ptr(), weights.data_ptr())  # fmt: skip
        bag = reference.bag(values, rows, weights)
        return bag if swilu is None else reference.silu_gate(bag, swilu)
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
