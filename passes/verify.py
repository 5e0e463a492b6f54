"""verify: each converted block runs, keeps its output shape, and in augment mode its outputs."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .blocks import TransformState

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


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
        with _eval_mode(converted.original, converted.replacement), torch.no_grad():
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
