"""share: one value table for every converted layer, as in Memory+ (Berges et al. 2024)."""

from __future__ import annotations

from ..runtime import MemcompileError, MemoryPool
from .blocks import TransformState

POOL_NAME = "memcompile_pool"


def share(state: TransformState) -> None:
    """Register a `MemoryPool` at the model root and point the new layers at it.

    A pool left by an earlier transform of the same model is reused, so converting more
    layers later keeps one table.
    """
    layers = [converted.layer for converted in state.converted]
    if not layers or not state.config.share_values:
        return
    shapes = {(layer.n_keys**2, layer.v_dim) for layer in layers}
    if len(shapes) > 1:
        raise MemcompileError(
            f"converted layers need value tables of different shapes {sorted(shapes)}: "
            "set v_dim explicitly or pass share_values=False"
        )
    (rows, v_dim), = shapes
    pool = getattr(state.model, POOL_NAME, None)
    if pool is None:
        weight = layers[0].query.weight
        pool = MemoryPool(
            rows, v_dim, seed=state.config.seed, dtype=weight.dtype, device=weight.device
        )
        state.model.add_module(POOL_NAME, pool)
    elif tuple(pool.values.shape) != (rows, v_dim):
        raise MemcompileError(
            f"the model already has a shared value table of shape {tuple(pool.values.shape)}; "
            f"new layers need {(rows, v_dim)}: use the same mem_size and v_dim, or "
            "share_values=False"
        )
    for layer in layers:
        layer.attach_pool(pool)
    state.pool = pool
