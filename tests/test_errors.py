"""Bad input to `memcompile.transform`: one MemcompileError with a one-line message that says
what to change, and the model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memcompile

from models import CASES, build

EXAMPLE = next(c for c in CASES if c.name == "example")

BAD_INPUTS = [
    (dict(layers=[7]), "valid layers are 0-2"),
    (dict(layers=[-1]), "valid layers are 0-2"),
    (dict(layers=[1, 1]), "listed twice"),
    (dict(layers=["encoder.1"]), "valid layers are 0-2"),
    (dict(layers=[1], mem_size="2M"), "1448**2"),
    (dict(layers=[1], mem_size="lots"), "K/M/G suffix"),
    (dict(layers=[1], mem_size=256, knn=0), "knn must be an integer >= 1"),
    (dict(layers=[1], mem_size=256, knn=17), "use knn <= 16"),
    (dict(layers=[1], mem_size=256, knn=4, heads=0), "heads must be an integer >= 1"),
    (dict(layers=[1], mem_size=256, knn=4, k_dim=31), "k_dim must be even"),
    (dict(layers=[1], mem_size=256, knn=4, gating="none", v_dim=48), "needs v_dim == d_out"),
    (dict(layers=[1], mem_size=256, knn=4, mode="swap"), "'replace' or 'augment'"),
    (dict(layers=[1], mem_size=256, knn=4, colour="red"), "unexpected keyword"),
]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize(("kwargs", "phrase"), BAD_INPUTS, ids=[p for _, p in BAD_INPUTS])
def test_bad_input_raises_one_clear_error_and_leaves_the_model(kwargs, phrase):
    model = build(EXAMPLE)
    before = _snapshot(model)
    with pytest.raises(memcompile.MemcompileError) as error:
        memcompile.transform(model, **kwargs)
    message = str(error.value)
    assert phrase in message
    assert "\n" not in message
    assert isinstance(error.value, ValueError)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_without_ffn_blocks():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(memcompile.MemcompileError, match="no FFN blocks found in Sequential"):
        memcompile.transform(model, layers=[0], mem_size=256, knn=4)


def test_not_a_module():
    with pytest.raises(memcompile.MemcompileError, match="needs a torch.nn.Module"):
        memcompile.transform("model.pt", layers=[0])
