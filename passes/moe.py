"""Mixture-of-experts blocks: found so they can be reported and refused, never converted.

A module is an MoE block when it holds its experts: a child named `experts` or of an
`...Experts` class (Mixtral, Qwen-MoE, OLMoE, DeepSeek, Llama 4, gpt-oss, Jamba). Class
names alone mislead: `Qwen2MoeForCausalLM` is a whole model, not an MoE block.
"""

from __future__ import annotations

from torch import nn


def is_moe_block(module: nn.Module) -> bool:
    return any(
        name == "experts" or type(child).__name__.endswith("Experts")
        for name, child in module.named_children()
    )


def inside(path: str, outer: str) -> bool:
    """True when the module at `path` is `outer` or one of its descendants."""
    return outer == "" or path == outer or path.startswith(f"{outer}.")


def find_moe_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost MoE blocks, in model order."""
    found: list[str] = []
    for path, module in model.named_modules():
        if not any(inside(path, outer) for outer in found) and is_moe_block(module):
            found.append(path)
    return found
