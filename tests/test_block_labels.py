"""Block labels stay what they were when a model was first converted, so that "convert more
layers later" (README) names the same blocks: labels that count blocks (root-graph ordinals,
"N.1" for a second FFN under one number, the stacks' names) count the converted ones too."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from zoo import ZOO

import memcompile

SMALL = {"mem_size": 64, "knn": 4, "heads": 2}


def _labels(model: nn.Module) -> list:
    return [b.index for b in memcompile.find_ffn_blocks(model)]


def _flat() -> nn.Module:
    torch.manual_seed(0)
    ffn = [nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)]
    return nn.Sequential(*ffn, *[nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)]).eval()


class _TwoFFNLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.mlp2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return x + self.mlp2(x + self.mlp(x))


class _TwoPerLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_TwoFFNLayer(), _TwoFFNLayer()])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


@pytest.mark.parametrize("mode", ["replace", "augment"])
@pytest.mark.parametrize(
    "build, first, rest",
    [
        (_flat, [0], [1]),
        (lambda: _TwoPerLayer().eval(), [0], ["0.1", 1, "1.1"]),
        (next(c for c in ZOO if c.name == "t5").build, ["encoder.0", "encoder.1"],
         ["decoder.0", "decoder.1"]),
    ],
    ids=["root-graph", "second-ffn", "stacks"],
)  # fmt: skip
def test_labels_of_the_blocks_left_do_not_change(build, first, rest, mode):
    model = build()
    assert _labels(model) == sorted([*first, *rest], key=_labels(model).index)
    memcompile.transform(model, layers=first, mode=mode, **SMALL)
    assert _labels(model) == rest
    assert _labels(pickle.loads(pickle.dumps(model))) == rest
    memcompile.transform(model, layers=rest[-1:], mode=mode, **SMALL)
    assert _labels(model) == rest[:-1]
    with pytest.raises(memcompile.MemcompileError, match="already a memory layer"):
        memcompile.transform(model, layers=first[:1], mode=mode, **SMALL)


def test_a_checkpoint_converted_in_two_steps_loads_with_its_labels(tmp_path):
    t5 = next(c for c in ZOO if c.name == "t5")
    model = t5.build()
    memcompile.transform(model, layers=["encoder.0", "encoder.1"], **SMALL)
    memcompile.transform(model, layers=["decoder.1"], **SMALL)
    memcompile.save(model, tmp_path / "ckpt")
    loaded = memcompile.load(tmp_path / "ckpt")
    assert _labels(loaded) == ["decoder.0"]
    inputs = t5.example_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_a_format_1_checkpoint_converted_in_steps_keeps_its_numbering(tmp_path):
    """Format 1's later steps numbered the blocks left unconverted: T5's step `[1]` after
    the encoder meant decoder.1. Such a checkpoint loads as it was made, keeps numbering so,
    and is saved as format 1 again."""
    import json

    from memcompile.passes.find_ffn import LEGACY_LABELS_ATTRIBUTE

    t5 = next(c for c in ZOO if c.name == "t5")
    model = t5.build()
    memcompile.transform(model, layers=["encoder.0", "encoder.1"], **SMALL)
    memcompile.transform(model, layers=["decoder.1"], **SMALL)
    memcompile.save(model, tmp_path / "new")
    manifest = json.loads((tmp_path / "new" / "memcompile.json").read_text())
    assert manifest["version"] == 2
    manifest["version"] = 1  # what the old code wrote for the same model:
    manifest["transforms"][1]["layers"] = [1]
    (tmp_path / "old").mkdir()
    for name in ("model.safetensors",):
        (tmp_path / "old" / name).write_bytes((tmp_path / "new" / name).read_bytes())
    (tmp_path / "old" / "memcompile.json").write_text(json.dumps(manifest))
    old = memcompile.load(tmp_path / "old")
    assert getattr(old, LEGACY_LABELS_ATTRIBUTE) and _labels(old) == [0]  # decoder.0, as then
    inputs = t5.example_inputs()
    with torch.no_grad():
        assert torch.equal(old(**inputs).logits, model(**inputs).logits)
    memcompile.save(old, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "memcompile.json").read_text())["version"] == 1
    assert _labels(memcompile.load(tmp_path / "again")) == [0]
