"""Mixture-of-experts blocks: found so they can be reported and refused, never converted.

A module is an MoE block when it holds experts (a child named `experts` or of an
`...Experts` class) and the router that picks them (a child named or typed `gate` or
`router`): Mixtral, Qwen-MoE, OLMoE, DeepSeek, Llama 4, gpt-oss, Jamba. Class names alone
mislead (`Qwen2MoeForCausalLM` is a whole model), and so do experts alone (a dict of task
heads). The model itself is never one: its FFNs are what is searched.
"""

from __future__ import annotations

from torch import nn

from .blocks import inside

_ROUTERS = ("gate", "router")


def is_moe_block(module: nn.Module) -> bool:
    children = [
        (name.lower(), type(child).__name__.lower()) for name, child in module.named_children()
    ]
    experts = any(name == "experts" or kind.endswith("experts") for name, kind in children)
    routed = any(word in name or word in kind for name, kind in children for word in _ROUTERS)
    return experts and routed


def find_moe_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost MoE blocks below the model, in model order."""
    found: list[str] = []
    for path, module in model.named_modules():
        if path and not any(inside(path, outer) for outer in found) and is_moe_block(module):
            found.append(path)
    return found
