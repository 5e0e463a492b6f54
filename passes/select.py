"""select: the blocks the user asked for, by block index."""

from __future__ import annotations

import re

import torch.fx as fx

from ..runtime import MemcompileError, MemoryLayer
from .blocks import TransformState


def _describe(labels: list[str]) -> str:
    if labels and all(label.isdigit() for label in labels):
        numbers = sorted(int(label) for label in labels)
        if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
            return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(labels)


def select(state: TransformState) -> None:
    """Fill `state.selected`; every FFN block when `state.layers` is None."""
    model_name = type(state.model).__name__
    if isinstance(state.model, fx.GraphModule):  # a torch.export program's module, say
        model_name = "the graph"
    if not state.blocks and state.moe_blocks:
        paths = list(state.moe_blocks.values())
        raise MemcompileError(
            f"no dense FFN blocks found in {model_name}: its {len(paths)} mixture-of-experts "
            f"blocks ({paths[0]}, ...) are not convertible"
        )
    if not state.blocks:
        converted = sum(isinstance(m, MemoryLayer) for m in state.model.modules())
        if converted:
            raise MemcompileError(
                f"no FFN blocks left in {model_name}: all are memory layers already "
                f"({converted} converted)"
            )
        raise MemcompileError(
            f"no FFN blocks found in {model_name}: memcompile converts Linear -> activation -> "
            "Linear and gated (SwiGLU/GeGLU) feed-forward blocks"
        )
    by_label = {block.label: block for block in state.blocks}
    if state.layers is None:
        state.selected = list(state.blocks)
        return
    labels = [str(layer) for layer in state.layers]
    if not labels:
        raise MemcompileError(f"no layers given: choose from {_describe(list(by_label))}")
    seen = set()
    for label in labels:
        if label in seen:
            raise MemcompileError(f"layer {label} is listed twice: list each layer once")
        seen.add(label)
        if label in state.moe_blocks:
            raise MemcompileError(
                f"layer {label} is a mixture-of-experts block ({state.moe_blocks[label]}), "
                f"which memcompile does not convert: choose from {_describe(list(by_label))}"
            )
        if label not in by_label and re.fullmatch(r"\d+-\d+", label):
            first, last = (int(end) for end in label.split("-"))
            raise MemcompileError(
                f"layer {label}: ranges are the command line's --layers syntax; in Python "
                f"pass range({first}, {last + 1}) or a list"
            )
        if label not in by_label:
            raise MemcompileError(
                f"layer {label} is not an FFN block of {model_name}: valid layers are "
                f"{_describe(list(by_label))}"
            )
    state.selected = [by_label[label] for label in labels]
