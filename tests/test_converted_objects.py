"""A converted model as a Python object: it pickles and unpickles (torch.save of the whole
model), and the report `transform` leaves on it describes blocks without holding the FFNs
that replace mode removed."""

from __future__ import annotations

import gc
import pickle
import weakref

import torch
from torch import nn

import memcompile

from models import CASES, VOCAB

LLAMA = next(c for c in CASES if c.name == "llama")
SMALL = {"mem_size": 256, "knn": 4, "heads": 2}


class InlineFFNBlock(nn.Module):
    """The FFN shares its forward with the norm and the residual: the block itself is
    rewritten (it becomes a traced graph), as no FFN module can be swapped."""

    def __init__(self, d: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class InlineStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InlineFFNBlock() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _round_trip(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def test_a_converted_hf_model_pickles_and_computes_the_same():
    torch.manual_seed(0)
    model = memcompile.transform(LLAMA.build().eval(), layers=[1], **SMALL)
    ids = torch.randint(0, VOCAB, (2, 7))
    copy = _round_trip(model)
    with torch.no_grad():
        assert torch.equal(LLAMA.logits(copy, ids), LLAMA.logits(model, ids))
    assert copy.memcompile_report.summary() == model.memcompile_report.summary()


def test_found_blocks_and_a_rewritten_inline_block_pickle():
    model = InlineStack().eval()
    blocks = memcompile.find_ffn_blocks(model)
    paths = [b.path for b in blocks]
    assert paths == ["layers.0", "layers.1"] and [b.path for b in _round_trip(blocks)] == paths
    memcompile.transform(model, layers=[0], **SMALL)
    assert isinstance(model.layers[0], torch.fx.GraphModule)  # traced, as the test means
    x = torch.randn(3, 5, 16)
    copy = _round_trip(model)
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))


def test_replace_mode_lets_the_removed_ffn_go():
    model = LLAMA.build().eval()
    removed = weakref.ref(model.model.layers[1].mlp.gate_proj.weight)
    kept = model.model.layers[0].mlp.gate_proj.weight
    memcompile.transform(model, layers=[1], **SMALL)
    gc.collect()
    assert removed() is None, "something still holds the FFN that replace mode removed"
    assert model.model.layers[0].mlp.gate_proj.weight is kept
    assert [b.capture for b in model.memcompile_report.blocks_found] == [None] * 3
