"""Mixture-of-experts blocks: found so they can be reported, never converted."""

from __future__ import annotations

import re

from torch import nn

_MOE_CLASS = re.compile(r"moe|experts|mixtureofexperts", re.IGNORECASE)


def find_moe_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost modules whose class is a mixture-of-experts block."""
    found: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{outer}.") for outer in found):
            continue
        if _MOE_CLASS.search(type(module).__name__):
            found.append(path)
    return found
