"""`inspect`'s estimates (memcompile.costs) against the layers transform builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memcompile
from memcompile.costs import memory_cost


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 24)) for _ in range(2)
        )

    def forward(self, x):
        for mlp in self.layers:
            x = x + mlp(x)
        return x


@pytest.mark.parametrize("gating", ["swilu", "none"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("mode", ["replace", "augment"])
def test_the_estimated_parameters_are_the_built_layers(gating, qk_norm, mode):
    torch.manual_seed(0)
    model = _Net()
    config = memcompile.MemoryConfig(mem_size=256, heads=2, knn=4, k_dim=16, gating=gating,
                                     qk_norm=qk_norm, mode=mode, share_values=False)  # fmt: skip
    block = memcompile.find_ffn_blocks(model)[1]
    cost = memory_cost(block, config)
    memcompile.transform(model, layers=[1], config=config)
    layer = next(m for m in model.modules() if isinstance(m, memcompile.MemoryLayer))
    assert layer.values.numel() == cost.value_params
    assert sum(p.numel() for p in layer.parameters()) == cost.layer_params + cost.value_params
