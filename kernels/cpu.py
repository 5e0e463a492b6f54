"""The C++ CPU kernels of a memory layer (`decode_kernels.cc` and `training_kernels.cc`,
through ctypes).

- `pk_lookup_cpu`, the CPU kernel of `memcompile::pk_lookup`. Up to LOOKUP_MAX_TOKENS, one
  call (`memcompile_lookup`) does it all: the half scores, each half's top-k, the product
  keys, the softmax, the bag (each picked row read once) and the Memory+ gating, where the
  plain-PyTorch lookup makes a dozen small ops (several microseconds apiece of Python and
  dispatch on a small CPU). For more tokens torch's matmul scores the halves and one call
  (`memcompile_lookup_scored`) does the rest a token at a time on torch's threads: about
  k ln k sums a token and head where the reference builds k x k candidate tensors (192 MB
  at 4096 tokens), and the bag and the gating while the token's picks are in cache.
- `decode`, a whole `MemoryLayer` forward for up to MAX_TOKENS tokens in one call
  (`memcompile_decode`): the projections, the lookup and the gating. At one token on a
  small CPU the layer is a few hundred microseconds of memory traffic, and each Python
  step between its ops cost several more (a cache-cold interpreter after each streamed
  weight).
- `pk_topk_cpu` and `bag_backward_cpu`, the CPU kernels of the differentiable ops a layer
  runs when it needs gradients: the product keys picked as in the lookup, and the bag's
  gradients without gathering the picked rows or atomics.

The kernels run on torch's OpenMP threads where the library shares torch's OpenMP runtime
(`native.shares_torch_openmp`), else on one thread. Other dtypes and malformed inputs run
the PyTorch ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

import torch

from . import native, ops, reference

log = logging.getLogger(__name__)

# Tokens up to which `decode` runs a whole layer in one call, and up to which pk_lookup's
# kernel scores the halves itself (beyond, torch's matmul is faster at the scores). On 2
# cores (d_model 1024, 512^2 values, knn 32, 4 heads): at 8 tokens the decode layer took
# 0.92x the time of the layer's ops; the whole C++ lookup took 0.83x the time of the
# scored one at 4 tokens, 1.19x at 8.
MAX_TOKENS = 8
LOOKUP_MAX_TOKENS = 4

_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "memcompile_lookup": (_P, _P, _INT, _I, _I, _I, _I, _I, _P, _INT, _I, _P, _P, _INT),
    "memcompile_lookup_scored": (_P, _I, _I, _I, _I, _P, _INT, _I, _P, _P, _INT),
    "memcompile_top_k": (_P, _I, _I, _I, _P, _P),
    "memcompile_pk_topk": (_P, _I, _I, _I, _I, _P, _P, _INT),
    "memcompile_bag_backward": (_P, _P, _P, _P, _I, _I, _I, _P, _P, _INT),
    "memcompile_decode": (
        _P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P, _INT, _I, _I, _I, _I, _P, _INT, _I, _P,
        _INT,
    ),
}  # fmt: skip
# How the kernels name a tensor's element type (`with_values` in cpu_kernels.h); keys and
# projections are float32 or bfloat16, values any of the three.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
# The C functions by name once the library is loaded; False where it cannot be.
_kernels: dict[str, ctypes._CFuncPtr] | bool | None = None
_registered = False  # whether register_cpu_kernels found a compiler


def _native() -> dict | bool:
    global _kernels
    if _kernels is None:
        library = native.loaded()
        if library is None:
            log.info("memcompile's memory layers run their PyTorch ops on the CPU")
            _kernels = False
            return _kernels
        functions = {}
        for name, argtypes in _SIGNATURES.items():
            try:
                function = getattr(library, name)
            except AttributeError:  # a library from an older source under the same name
                log.warning("memcompile's C++ CPU kernels lack %s: PyTorch runs", name)
                _kernels = False
                return _kernels
            function.argtypes, function.restype = argtypes, None
            functions[name] = function
        _kernels = functions  # published whole: another thread may read it now
    return _kernels


@contextlib.contextmanager
def pytorch_only() -> Iterator[None]:
    """Inside, memory layers on the CPU run their PyTorch ops, as where no compiler built
    the kernels: for tests and benchmarks that compare the two."""
    global _kernels
    kernels, _kernels = _native(), False
    try:
        yield
    finally:
        _kernels = kernels


def _threads() -> int:
    return torch.get_num_threads() if native.shares_torch_openmp() else 1


def _eager_cpu(x: torch.Tensor) -> bool:
    """Whether x is a plain CPU tensor outside torch.compile's tracing and outside dispatch
    modes (FlopCounterMode, fake tensors): calls into the kernels there skip torch's
    dispatcher, so a trace or a mode must see the ops instead."""
    return (
        _registered
        and type(x) is torch.Tensor
        and x.is_cpu
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
    )


def _query_fits(q, keys, knn) -> bool:
    """Whether the C++ top-k takes these: tokens (N >= 1, H, k_dim) and CPU keys (H, 2,
    n_keys, k_dim / 2), both float32 or both bfloat16, 1 <= knn <= n_keys. Anything else
    (and malformed input, which the reference rejects) runs the reference."""
    if q.dim() != 3 or keys.dim() != 4:
        return False
    n, heads, k_dim = q.shape
    return (
        n >= 1
        and 1 <= knn <= keys.shape[2]
        and keys.shape == (heads, 2, keys.shape[2], k_dim // 2)
        and k_dim % 2 == 0
        and q.dtype == keys.dtype
        and q.dtype in _WEIGHT_DTYPES
        and keys.is_cpu
    )


def _fits(q, keys, values, knn, swilu) -> bool:
    """Whether the C++ lookup takes these inputs: `_query_fits`, a contiguous float32,
    float16 or bfloat16 CPU table of n_keys**2 rows and a gate of the bag's shape in the
    query's dtype."""
    if not _query_fits(q, keys, knn) or values.dim() != 2:
        return False
    return (
        values.dtype in _DTYPE_CODES
        and values.shape[0] == keys.shape[2] ** 2
        and values.is_contiguous()
        and values.is_cpu
        and (swilu is None or (swilu.dtype == q.dtype and swilu.is_cpu))
        and (swilu is None or swilu.shape == (q.shape[0], values.shape[1]))
    )


def pk_lookup_cpu(q, keys, values, knn, swilu=None):
    kernels = _native() if _fits(q, keys, values, knn, swilu) else None
    if not kernels:
        return reference.pk_lookup(q, keys, values, knn, swilu)
    n, heads = q.shape[:2]
    # A bfloat16 gate: the kernel sums the bag and the gating runs as the reference's, which
    # rounds the bag, silu(gate) and their product (the sharded lookups run those ops).
    gate_here = swilu if swilu is not None and swilu.dtype is torch.float32 else None
    # Bound to names: a temporary's memory would be freed before the call reads it.
    gate = None if gate_here is None else gate_here.contiguous()
    gate_address = None if gate is None else gate.data_ptr()
    out = torch.empty(n, values.shape[1], dtype=torch.float32)
    if n <= LOOKUP_MAX_TOKENS:
        q, keys = q.float().contiguous(), keys.contiguous()
        kernels["memcompile_lookup"](
            q.data_ptr(), keys.data_ptr(), _DTYPE_CODES[keys.dtype], n, heads, keys.shape[2],
            keys.shape[3], knn, values.data_ptr(), _DTYPE_CODES[values.dtype], values.shape[1],
            gate_address, out.data_ptr(), _threads(),
        )  # fmt: skip
    else:
        scores = reference.half_scores(q, keys).contiguous()  # torch's threaded matmul
        kernels["memcompile_lookup_scored"](
            scores.data_ptr(), n, heads, keys.shape[2], knn, values.data_ptr(),
            _DTYPE_CODES[values.dtype], values.shape[1], gate_address, out.data_ptr(),
            _threads(),
        )  # fmt: skip
    if swilu is None:
        return out.to(values.dtype)
    return out if gate_here is not None else reference.silu_gate(out.to(values.dtype), swilu)


def pk_topk_cpu(q, keys, knn):
    """The CPU kernel of `memcompile::pk_topk`: torch's matmul scores the halves, then
    `memcompile_pk_topk` picks each (token, head)'s product keys on torch's threads."""
    kernels = _native() if _query_fits(q, keys, knn) else None
    if not kernels:
        return reference.pk_topk(q, keys, knn)
    n, heads = q.shape[:2]
    scores = reference.half_scores(q, keys).contiguous()
    best = torch.empty(n, heads, knn, dtype=torch.float32)
    rows = torch.empty(n, heads, knn, dtype=torch.int64)
    kernels["memcompile_pk_topk"](scores.data_ptr(), n, heads, keys.shape[2], knn,
                                  best.data_ptr(), rows.data_ptr(), _threads())  # fmt: skip
    return best, rows


def bag_backward_cpu(grad_out, values, indices, weights):
    """The CPU kernel of `memcompile::bag_backward` for float32 tables: both gradients
    without gathering the picked rows into a tensor (the reference's 268 MB at 2,048 tokens
    of 128 picks of 256 columns) or atomics. Other dtypes, and indices outside the table
    (which the reference refuses), run the reference."""
    plain = all(type(t) in PLAIN_TENSORS and t.is_cpu for t in (grad_out, values, indices, weights))
    kernels = _native() if plain else None
    n, picks = indices.shape if indices.dim() == 2 else (0, 0)
    fits = (
        kernels
        and n >= 1
        and picks >= 1
        and values.dim() == 2
        and values.dtype == grad_out.dtype == weights.dtype == torch.float32
        and indices.dtype == torch.int64
        and weights.shape == indices.shape
        and grad_out.shape == (n, values.shape[1])
        and values.is_contiguous()
        and grad_out.is_contiguous()
    )
    if not fits:
        return reference.bag_backward(grad_out, values, indices, weights)
    low, high = indices.aminmax()
    if low < 0 or high >= values.shape[0]:
        return reference.bag_backward(grad_out, values, indices, weights)
    indices, weights = indices.contiguous(), weights.contiguous()
    grad_values = torch.zeros_like(values)
    grad_weights = torch.empty(n, picks, dtype=torch.float32)
    kernels["memcompile_bag_backward"](
        grad_out.data_ptr(), values.data_ptr(), indices.data_ptr(), weights.data_ptr(), n,
        picks, values.shape[1], grad_values.data_ptr(), grad_weights.data_ptr(), _threads(),
    )  # fmt: skip
    return grad_values, grad_weights


def bag_backward_rows_cpu(grad_out, values, indices, weights, rows):
    """The CPU kernel of `memcompile::bag_backward_rows`: `bag_backward_cpu` on the picked
    rows alone (a copy of them as the table, the picks renumbered into it)."""
    return bag_backward_cpu(grad_out, values[rows], torch.searchsorted(rows, indices), weights)


WeightBias = tuple[torch.Tensor, "torch.Tensor | None"]  # a projection's
_NO_PROJECTION = (None, None)
# Exactly these types, not subclasses (DTensor shards, fake, quantized or offloaded tensors),
# whose data_ptr() is the data the kernels read.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def decode(
    x: torch.Tensor,
    query: WeightBias,
    swilu: WeightBias | None,
    out: WeightBias | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    knn: int,
) -> torch.Tensor | None:
    """A memory layer's forward for x (..., d_in), at most MAX_TOKENS tokens, in one C++
    call: the query projection, the lookup (as pk_lookup, gated by the `swilu` projection
    when given) and the `out` projection when given. Returns (..., d_out) float32, or
    (..., v_dim) without `out`. None where the kernel does not take these inputs, and the
    caller runs the ops: anything but plain contiguous CPU tensors of matching shapes in
    eager mode, with the projections, their biases and the keys all float32 (x float32;
    values float32, or 16-bit with the gate) or all bfloat16 (x bfloat16; values bfloat16
    or float32; rounded where the layer's ops round)."""
    if not _eager_cpu(x) or type(keys) not in PLAIN_TENSORS or type(values) not in PLAIN_TENSORS:
        return None
    (wq, bq), (ws, bs), (wo, bo) = query, swilu or _NO_PROJECTION, out or _NO_PROJECTION
    dtype = wq.dtype
    if dtype not in _WEIGHT_DTYPES or x.dtype not in (torch.float32, dtype):
        return None
    for t in (x, keys, wq, bq, ws, bs, wo, bo):
        if t is not None and not (t.is_cpu and t.is_contiguous() and (t is x or t.dtype is dtype)):
            return None
    # A float32 layer: 16-bit values only where the gate's product comes before any
    # rounding, as in pk_lookup (without the gate, the ops round the bag to their dtype). A
    # bfloat16 layer rounds where its ops do (decode_kernels.cc), with bfloat16 or float32
    # values, which round alike.
    if dtype is torch.bfloat16:
        fits = values.dtype in (torch.float32, torch.bfloat16) and x.dtype is dtype
    else:
        fits = values.dtype is torch.float32 or (
            values.dtype in (torch.float16, torch.bfloat16) and ws is not None
        )
    if not fits:
        return None
    if not (values.is_cpu and values.is_contiguous()):
        return None
    if x.dim() == 0 or keys.dim() != 4 or values.dim() != 2:
        return None
    (heads, two, n_keys, half), (rows, v_dim) = keys.shape, values.shape
    d_in = x.shape[-1]
    n = x.numel() // d_in if d_in else 0
    k_rows = heads * 2 * half
    d_out = v_dim if wo is None else wo.shape[0]
    if not (
        1 <= n <= MAX_TOKENS
        and two == 2
        and 1 <= knn <= n_keys
        and rows == n_keys * n_keys
        and wq.shape == (k_rows, d_in)
        and (bq is None or bq.shape == (k_rows,))
        and (ws is None or (ws.shape == (v_dim, d_in) and (bs is None or bs.shape == (v_dim,))))
        and (wo is None or (wo.shape == (d_out, v_dim) and (bo is None or bo.shape == (d_out,))))
    ):
        return None
    kernels = _native()
    if not kernels:
        return None
    y = torch.empty((*x.shape[:-1], d_out), dtype=torch.float32)
    x = x.float()  # bound to a name: the kernel reads it
    kernels["memcompile_decode"](
        x.data_ptr(), n, d_in, wq.data_ptr(), _address(bq), _address(ws), _address(bs),
        _address(wo), _address(bo), d_out, keys.data_ptr(), _DTYPE_CODES[dtype], heads,
        n_keys, half, knn, values.data_ptr(), _DTYPE_CODES[values.dtype], v_dim, y.data_ptr(),
        _threads(),
    )  # fmt: skip
    return y


def register_cpu_kernels() -> bool:
    """Install the C++ kernels of pk_lookup, pk_topk and bag_backward for CPU tensors (the
    library is built at the first call); False where no C++ compiler is found."""
    global _registered
    if native._compiler() is None:
        log.info("no C++ compiler: memcompile's ops run their PyTorch reference on the CPU")
        return False
    ops.pk_lookup.register_kernel("cpu")(pk_lookup_cpu)
    ops.pk_topk.register_kernel("cpu")(pk_topk_cpu)
    ops.bag_backward.register_kernel("cpu")(bag_backward_cpu)
    ops.bag_backward_rows.register_kernel("cpu")(bag_backward_rows_cpu)
    _registered = True
    return True
