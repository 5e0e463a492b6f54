"""What a conversion costs and adds: parameters, bytes and FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass

from .passes import FFNBlock
from .runtime import MemoryConfig

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


def ffn_flops_per_token(block: FFNBlock) -> int:
    """Multiply-adds x 2 of the FFN's projections (elementwise work ignored)."""
    projections = 3 if block.kind in ("gated", "fused_gated") else 2
    return 2 * projections * block.d_model * block.d_hidden


@dataclass(frozen=True)
class MemoryCost:
    layer_params: int  # all but the values: query, its norm, keys, swilu and out, or gate
    value_params: int  # one value table
    flops_per_token: int

    def bytes(self, dtype: str) -> int:
        return (self.layer_params + self.value_params) * BYTES_PER_DTYPE[dtype]


def memory_cost(block: FFNBlock, config: MemoryConfig) -> MemoryCost:
    """Parameters and FLOPs per token of the memory layer that would replace `block`."""
    c = config.resolve(block.d_model, block.d_out or block.d_model)
    d, k, v, heads = block.d_model, c.k_dim, c.v_dim, c.heads
    d_out = block.d_out or d
    params = d * heads * k + heads * k + heads * 2 * c.n_keys * (k // 2)
    flops = 2 * d * heads * k  # query projection
    flops += 2 * heads * c.n_keys * k  # both halves scored against their sub-keys
    flops += heads * c.knn * c.knn  # candidate sums
    flops += 2 * heads * c.knn * v  # weighted bag
    if c.qk_norm:
        params += k
    if c.gating == "swilu":
        params += d * v + v + v * d_out + d_out
        flops += 2 * d * v + 2 * v * d_out
    elif c.mode == "augment":
        params += 1  # the learned scale of the memory's output, 0 at init
    return MemoryCost(params, c.n_keys**2 * v, flops)
