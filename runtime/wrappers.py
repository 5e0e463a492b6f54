"""Modules that put a memory layer beside an FFN (augment mode) or into a split FFN.

Every module here, and `MemoryLayer`, carries `_memcompile_converted = True`, so the
passes never convert the inside of an already-converted block again.
"""

from __future__ import annotations

import torch
from torch import nn

from .memory_layer import MemoryLayer

CONVERTED_MARK = "_memcompile_converted"


class AugmentedFFN(nn.Module):
    """ffn(x, ...) + memory(x): the original block runs untouched, so with the memory's
    zero-initialised output the block's outputs are bit-identical at init."""

    _memcompile_converted = True

    def __init__(self, ffn: nn.Module, memory: MemoryLayer) -> None:
        super().__init__()
        self.ffn = ffn
        self.memory = memory

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.ffn(x, *args, **kwargs) + self.memory(x)


class SplitFFNEntry(nn.Module):
    """First half of a split FFN (BERT's `intermediate`, or an up projection) in augment mode.

    Returns [first_half(x), memory(x)] concatenated on the last dim; `SplitFFNExit` in the
    sibling module splits them again, so the memory output reaches the down projection
    without changing the parent's code.
    """

    _memcompile_converted = True

    def __init__(self, first_half: nn.Module, memory: MemoryLayer) -> None:
        super().__init__()
        self.ffn = first_half
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.ffn(x)
        return torch.cat([hidden, self.memory(x).to(hidden.dtype)], dim=-1)


class PackedActivation(nn.Module):
    """The activation of an FFN whose hidden state travels packed with a memory output
    ([hidden, memory] on the last dim): applied to the hidden part only."""

    _memcompile_converted = True

    def __init__(self, act: nn.Module, d_hidden: int) -> None:
        super().__init__()
        self.act = act
        self.d_hidden = d_hidden

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        # Contiguous, as in the original block: strided inputs take other (not bit-identical)
        # elementwise loops.
        hidden = self.act(packed[..., : self.d_hidden].contiguous())
        return torch.cat([hidden, packed[..., self.d_hidden :]], dim=-1)


class SplitFFNExit(nn.Module):
    """Down projection of a split FFN in augment mode: down(hidden) + memory output."""

    _memcompile_converted = True

    def __init__(self, down: nn.Module, d_hidden: int) -> None:
        super().__init__()
        self.down = down
        self.d_hidden = d_hidden

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden = packed[..., : self.d_hidden].contiguous()
        return self.down(hidden) + packed[..., self.d_hidden :]
