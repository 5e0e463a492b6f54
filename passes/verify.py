"""verify: each converted block runs, keeps its output shape, and in augment mode its outputs."""

from __future__ import annotations

import logging

import torch

from ..runtime.modes import training_mode
from .blocks import TransformState

log = logging.getLogger(__name__)


def verify(state: TransformState) -> None:
    """Run each converted block and its original on a probe input, in eval mode.

    Raises RuntimeError (an internal error, not bad input) when shapes differ or, in
    augment mode, when outputs are not bit-identical.
    """
    augment = state.config.mode == "augment"
    generator = torch.Generator().manual_seed(0)
    for converted in state.converted:
        if converted.original is None:
            log.debug("verify: %s was rewritten as a graph: not probed", converted.block.path)
            continue
        # A shared pool is no parameter of the layer: its table may be lazy from before.
        lazy = converted.layer.value_table.is_meta or state.lazy_values
        if lazy or any(p.is_meta for p in converted.layer.parameters()):
            log.debug("verify: %s has lazy values: not probed", converted.block.path)
            continue
        weight = next(converted.original.parameters())
        probe = torch.randn(2, 3, converted.block.d_model, generator=generator)
        probe = probe.to(dtype=weight.dtype, device=weight.device)
        modules = converted.original, converted.replacement
        with training_mode(*modules, training=False), torch.no_grad():
            before = converted.original(probe)
            after = converted.replacement(probe)
        if after.shape != before.shape:
            raise RuntimeError(
                f"internal error: block {converted.block.label} now returns {tuple(after.shape)}"
                f" instead of {tuple(before.shape)}"
            )
        if augment and not torch.equal(before, after):
            raise RuntimeError(
                f"internal error: augmented block {converted.block.label} changed its outputs"
            )
