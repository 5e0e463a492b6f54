"""share: one value table for every converted layer, as in Memory+ (Berges et al. 2024)."""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import MemcompileError, MemoryPool
from .blocks import TransformState

POOL_NAME = "memcompile_pool"


def check_shareable(
    model: nn.Module, shapes: set[tuple[int, int]], dtype: torch.dtype | None = None
) -> None:
    """Raise MemcompileError unless one table, and the model's pool if any, fits all `shapes`
    (and `dtype`, when the new layers ask for one).

    `rewrite` calls this before it changes the model, so a bad request leaves it untouched.
    """
    if len(shapes) > 1:
        raise MemcompileError(
            f"converted layers need value tables of different shapes {sorted(shapes)}: "
            "set v_dim explicitly or pass share_values=False"
        )
    pool = getattr(model, POOL_NAME, None)
    if pool is not None and shapes and {tuple(pool.values.shape)} != shapes:
        raise MemcompileError(
            f"the model already has a shared value table of shape {tuple(pool.values.shape)}; "
            f"new layers need {next(iter(shapes))}: use the same mem_size and v_dim, or "
            "share_values=False"
        )
    if pool is not None and dtype is not None and pool.values.dtype != dtype:
        have, want = (str(d).removeprefix("torch.") for d in (pool.values.dtype, dtype))
        raise MemcompileError(
            f"the model's shared value table is {have}; new layers ask for dtype {want}: "
            "use the same dtype, or share_values=False"
        )


def share(state: TransformState) -> None:
    """Register a `MemoryPool` at the model root and point the new layers at it.

    A pool left by an earlier transform of the same model is reused, so converting more
    layers later keeps one table.
    """
    layers = [converted.layer for converted in state.converted]
    if not layers or not state.config.share_values:
        return
    shapes = {(layer.n_keys**2, layer.v_dim) for layer in layers}
    check_shareable(state.model, shapes)
    ((rows, v_dim),) = shapes
    pool = getattr(state.model, POOL_NAME, None)
    if pool is None:
        weight = layers[0].query.weight
        pool = MemoryPool(
            rows,
            v_dim,
            seed=state.config.seed,
            dtype=weight.dtype,
            device=weight.device,
            lazy=state.lazy_values,
        )
        state.model.add_module(POOL_NAME, pool.train(state.model.training))
    for layer in layers:
        layer.attach_pool(pool)
    state.pool = pool
