"""Bad input to `memcompile.transform`: one MemcompileError with a one-line message that says
what to change, and the model left untouched."""

from __future__ import annotations

import numpy as np
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
    (dict(layers=[True]), "layers takes block indices"),
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
    (dict(layers=[1], mem_size=256, knn=4, seed="0"), "seed must be an integer"),
    (dict(layers=[1], mem_size=256, knn=4, qk_norm="no"), "qk_norm must be True or False"),
    (dict(layers=[1], mem_size=256, knn=4, share_values="False"), "share_values must be True"),
    (dict(layers=[1], mem_size=256, config=memcompile.MemoryConfig()), "not both"),
    (dict(layers=[1], config=dict(mem_size=256)), "config takes a MemoryConfig"),
    (dict(layers=[1], config=memcompile.MemoryConfig(mem_size=256, knn=4), topk=3),
     "unexpected keyword"),
]  # fmt: skip


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
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    program = torch.export.export(model, (torch.randn(2, 8),))
    with pytest.raises(memcompile.MemcompileError, match=r"pass program.module\(\)"):
        memcompile.transform(program, layers=[0])


def test_numpy_and_tensor_integers_are_integers():
    """Indices and sizes often come out of numpy or torch: they convert as Python ints do."""
    want = memcompile.transform(build(EXAMPLE), layers=[1, 2], mem_size=256, knn=4, heads=2)
    for layers in (np.array([1, 2]), torch.tensor([1, 2]), [np.int64(1), np.int64(2)]):
        model = memcompile.transform(
            build(EXAMPLE), layers=layers, mem_size=np.int64(256), knn=np.int32(4), heads=2
        )
        assert model.memcompile_report.config == want.memcompile_report.config
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      want.state_dict().values()))  # fmt: skip


def test_a_sequential_model_runs_with_the_shared_table_at_its_root():
    def mlp():
        return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))

    model = nn.Sequential(*[mlp() for _ in range(3)])
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = model(x)
    memcompile.transform(model, layers=[0, 2], mem_size=256, knn=4, mode="augment")
    assert list(model)[-1] is model.memcompile_pool  # called last, by Sequential.forward
    with torch.no_grad():
        assert torch.equal(model(x), before)  # augment: unchanged at init


def test_layers_may_be_a_zero_dimensional_tensor_or_array():
    for layer in (torch.tensor(1), np.int64(1), np.array(1)):
        model = memcompile.transform(build(EXAMPLE), layers=layer, mem_size=256, knn=4)
        assert [b.index for b in model.memcompile_report.converted] == [1]


def test_more_layers_must_match_the_shared_table():
    model = memcompile.transform(build(EXAMPLE), layers=[0], mem_size=256, knn=4)
    for options, message in [
        (dict(mem_size=1024), "already has a shared value table of shape"),
        (dict(mem_size=256, dtype="bfloat16"), "shared value table is float32; new layers ask"),
    ]:
        with pytest.raises(memcompile.MemcompileError, match=message):
            memcompile.transform(model, layers=[1], knn=4, **options)
    assert model.memcompile_pool.values.dtype == torch.float32
    memcompile.transform(model, layers=[1], mem_size=256, knn=4, dtype="float32")  # the same
