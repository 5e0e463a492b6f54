"""FFN pattern recognition, block indices and augment-mode exactness on small synthetic models.

Every model here is plain PyTorch built in this file; the expected kinds, widths, paths and
indices come from the module definitions, and augment mode is checked bit for bit against the
outputs of the untouched model.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import memcompile
from memcompile import MemcompileError

D, H = 16, 48  # d_model, d_hidden of every FFN below
SMALL = {"mem_size": 256, "knn": 4, "heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- FFN modules, one per pattern


class MLP(nn.Module):
    """fc2(act(fc1(x))), the activation a module (`act`) or a function (`fn`)."""

    def __init__(self, act: nn.Module | None = None, fn=None, dropout: str | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.act, self.fn, self.drop_kind = act, fn, dropout
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h) if self.act is not None else self.fn(h)
        if self.drop_kind == "module":
            h = self.drop(h)
        elif self.drop_kind == "function":
            h = F.dropout(h, p=0.25, training=self.training)
        return self.fc2(h)


class Gated(nn.Module):
    """down(act(gate(x)) * up(x)), or with the product's operands swapped."""

    def __init__(self, fn, swap: bool = False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, D)
        self.fn, self.swap = fn, swap

    def forward(self, x):
        if self.swap:
            return self.down(self.up(x) * self.fn(self.gate(x)))
        return self.down(self.fn(self.gate(x)) * self.up(x))


class FusedGated(nn.Module):
    """Phi-3: one gate_up projection split by chunk(2, dim=-1)."""

    def __init__(self, torch_chunk: bool = False, up_first: bool = False):
        super().__init__()
        self.gate_up, self.down = nn.Linear(D, 2 * H, bias=False), nn.Linear(H, D, bias=False)
        self.torch_chunk, self.up_first = torch_chunk, up_first

    def forward(self, x):
        h = self.gate_up(x)
        if self.torch_chunk:
            parts = torch.chunk(h, 2, dim=-1)
            return self.down(F.silu(parts[0]) * parts[1])
        if self.up_first:
            up, gate = h.chunk(2, -1)
            return self.down(up * F.silu(gate))
        gate, up = h.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(H, D), Conv1D(D, H)
        self.act, self.dropout = nn.GELU(approximate="tanh"), nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class T5DenseActDense(nn.Module):
    """T5: reads `self.wo.weight` in a check that tracing leaves as an unused node."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)
        self.act, self.dropout = nn.ReLU(), nn.Dropout(0.1)

    def forward(self, hidden_states):
        hidden_states = self.dropout(self.act(self.wi(hidden_states)))
        if (
            isinstance(self.wo.weight, torch.Tensor)
            and hidden_states.dtype != self.wo.weight.dtype
            and self.wo.weight.dtype != torch.int8
        ):
            hidden_states = hidden_states.to(self.wo.weight.dtype)
        return self.wo(hidden_states)


class Block(nn.Module):
    """A pre-norm residual block around an FFN module at `mlp`."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(D), mlp

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class Stack(nn.Module):
    def __init__(self, make_mlp, n: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(Block(make_mlp()) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class InlineBlock(nn.Module):
    """The FFN shares its forward with the norm and the residual: no module to swap."""

    def __init__(self, read_weight: bool = False):
        super().__init__()
        self.ln, self.fc1, self.act, self.fc2 = (
            nn.LayerNorm(D),
            nn.Linear(D, H),
            nn.GELU(),
            nn.Linear(H, D),
        )
        self.read_weight = read_weight

    def forward(self, x):
        h = self.act(self.fc1(self.ln(x)))
        if self.read_weight and not isinstance(self.fc2.weight, torch.Tensor):
            h = h.float()  # never runs: traced, the weight read stays as an unused node
        return x + self.fc2(h)


class ResidualMLP(nn.Module):
    """Bloom: forward(hidden, residual) adds the residual inside the MLP."""

    def __init__(self):
        super().__init__()
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, hidden, residual):
        return (
            F.dropout(self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden))), 0.1, False) + residual
        )


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(D), ResidualMLP()

    def forward(self, x):
        return self.mlp(self.ln(x), x)


class Attention(nn.Module):
    """Stands in for attention: one projection, no activation (not an FFN)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return x + self.proj(x)


class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.intermediate_act_fn = nn.Linear(D, H), nn.GELU()

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class Output(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = nn.Linear(H, D), nn.Dropout(0.1), nn.LayerNorm(D)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    """BERT's split FFN: `intermediate` (Linear + act) and `output` (Linear, dropout, norm)."""

    def __init__(self):
        super().__init__()
        self.attention, self.intermediate, self.output = Attention(), Intermediate(), Output()

    def forward(self, x):
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


def stack_of(make_mlp):
    return lambda: Stack(make_mlp)


def layer_stack(make_layer, n: int = 4):
    """A Stack whose layers are `make_layer()` themselves, not Blocks around an FFN."""

    def make():
        model = Stack(make_layer, n=0)
        model.layers = nn.ModuleList(make_layer() for _ in range(n))
        return model

    return make


# (name, FFN module factory, activation); every FFN maps D -> H -> D
MLP_PATTERNS = [
    ("gelu_module", lambda: MLP(nn.GELU()), "gelu"),
    ("gelu_tanh_module", lambda: MLP(nn.GELU(approximate="tanh")), "gelu_tanh"),
    ("relu_module", lambda: MLP(nn.ReLU()), "relu"),
    ("silu_module", lambda: MLP(nn.SiLU()), "silu"),
    ("gelu_function", lambda: MLP(fn=F.gelu), "gelu"),
    ("gelu_tanh_function", lambda: MLP(fn=lambda h: F.gelu(h, approximate="tanh")), "gelu_tanh"),
    ("relu_function", lambda: MLP(fn=F.relu), "relu"),
    ("torch_relu", lambda: MLP(fn=torch.relu), "relu"),
    ("silu_function", lambda: MLP(fn=F.silu), "silu"),
    ("relu_method", lambda: MLP(fn=lambda h: h.relu()), "relu"),
    ("silu_written_out", lambda: MLP(fn=lambda h: h * torch.sigmoid(h)), "silu"),
    ("dropout_module", lambda: MLP(nn.GELU(), dropout="module"), "gelu"),
    ("dropout_function", lambda: MLP(fn=F.relu, dropout="function"), "relu"),
    ("sequential", lambda: nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)), "relu"),
    ("gpt2_conv1d", GPT2MLP, "gelu_tanh"),
    ("t5_weight_check", T5DenseActDense, "relu"),
]
GATED_PATTERNS = [
    ("swiglu", lambda: Gated(F.silu), "gated", "silu"),
    ("swiglu_swapped", lambda: Gated(F.silu, swap=True), "gated", "silu"),
    ("geglu", lambda: Gated(F.gelu), "gated", "gelu"),
    ("geglu_swapped_module", lambda: Gated(nn.GELU(), swap=True), "gated", "gelu"),
    ("fused_method_chunk", FusedGated, "fused_gated", "silu"),
    ("fused_torch_chunk", lambda: FusedGated(torch_chunk=True), "fused_gated", "silu"),
    ("fused_up_half_first", lambda: FusedGated(up_first=True), "fused_gated", "silu"),
]
# name -> (model factory, kind, activation, path of the FFN in layer i)
PATTERNS = {
    **{n: (stack_of(f), "mlp", a, "layers.{}.mlp") for n, f, a in MLP_PATTERNS},
    **{n: (stack_of(f), k, a, "layers.{}.mlp") for n, f, k, a in GATED_PATTERNS},
    "split_bert": (layer_stack(BertLayer), "split", "gelu", "layers.{}.intermediate"),
    "inline_block": (layer_stack(InlineBlock), "mlp", "gelu", "layers.{}"),
    "inline_weight_read": (
        layer_stack(lambda: InlineBlock(read_weight=True)),
        "mlp",
        "gelu",
        "layers.{}",
    ),
    "residual_input": (layer_stack(ResidualBlock), "mlp", "gelu", "layers.{}.mlp"),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return PATTERNS[name][0]().eval()


# ---------------------------------------------------------------- recognition


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_is_found_with_kind_widths_activation_path_index(name):
    _, kind, activation, path = PATTERNS[name]
    blocks = memcompile.find_ffn_blocks(build(name))
    assert [(b.index, b.path) for b in blocks] == [(i, path.format(i)) for i in range(4)]
    for block in blocks:
        assert (block.kind, block.d_model, block.d_hidden, block.activation) == (
            kind,
            D,
            H,
            activation,
        )


class HiddenReused(nn.Module):
    """The hidden activation also feeds a second output: the FFN cannot be cut out."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        return self.fc2(h) + h.mean(-1, keepdim=True)


class NoActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(D, H), nn.Dropout(0.1), nn.Linear(H, D)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x)))


class NormBetween(nn.Module):
    """A parameterless, non element-wise module between the projections is no activation."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm = nn.Linear(D, H), nn.LayerNorm(H, elementwise_affine=False)
        self.fc2 = nn.Linear(H, D)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class Passthrough(nn.Module):
    def forward(self, x):
        return x


class Half(nn.Module):
    def forward(self, x):
        return 0.5 * x


class HalfPlusOne(nn.Module):
    def forward(self, x):
        return 0.5 * x + 1.0


NOT_FFN = {
    "hidden_reused": HiddenReused,
    "no_activation": NoActivation,
    "norm_between": NormBetween,
    "one_projection": Attention,
    "identity_module_between": lambda: MLP(Passthrough()),
    "linear_module_between": lambda: MLP(Half()),
    "affine_module_between": lambda: MLP(HalfPlusOne()),
}


@pytest.mark.parametrize("make", list(NOT_FFN.values()), ids=list(NOT_FFN))
def test_non_ffn_modules_are_not_reported(make):
    torch.manual_seed(0)
    model = Stack(make, n=2)
    assert memcompile.find_ffn_blocks(model) == []
    with pytest.raises(MemcompileError, match="no FFN blocks found"):
        memcompile.transform(model, **SMALL)


def test_reused_hidden_next_to_a_real_ffn_only_the_real_one_is_found():
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([Block(HiddenReused()), Block(MLP(nn.GELU()))])
    assert [(b.index, b.path) for b in memcompile.find_ffn_blocks(model)] == [(1, "layers.1.mlp")]


@pytest.mark.parametrize(
    ("act", "name"), [(nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"), (nn.Hardtanh(), "Hardtanh")]
)
def test_other_elementwise_activation_modules_are_named(act, name):
    torch.manual_seed(0)
    (block,) = memcompile.find_ffn_blocks(Stack(lambda: MLP(act), n=1))
    assert (block.kind, block.activation, block.d_hidden) == ("mlp", name, H)


# ---------------------------------------------------------------- block indices


class EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = (
            Stack(lambda: MLP(nn.ReLU()), 3),
            Stack(lambda: Gated(F.silu), 4),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_single_stack_indices_are_the_layer_numbers():
    torch.manual_seed(0)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList(Block(MLP(nn.GELU())) for _ in range(6))
    blocks = memcompile.find_ffn_blocks(model)
    assert [b.index for b in blocks] == list(range(6))
    assert blocks[3].path == "model.layers.3.mlp" and blocks[3].label == "3"


def test_encoder_decoder_labels_name_the_stack():
    torch.manual_seed(0)
    blocks = memcompile.find_ffn_blocks(EncoderDecoder())
    expected = [f"encoder.{i}" for i in range(3)] + [f"decoder.{i}" for i in range(4)]
    assert [b.index for b in blocks] == expected
    assert [b.path for b in blocks] == [f"{e.split('.')[0]}.layers.{e[-1]}.mlp" for e in expected]
    assert [b.kind for b in blocks] == ["mlp"] * 3 + ["gated"] * 4


def test_encoder_decoder_transform_converts_exactly_the_labels_given():
    torch.manual_seed(0)
    model = EncoderDecoder().eval()
    x = torch.randn(2, 5, D)
    memcompile.transform(model, ["encoder.1", "decoder.0"], **SMALL)
    converted = {p for p, m in model.named_modules() if isinstance(m, memcompile.MemoryLayer)}
    assert converted == {"encoder.layers.1.mlp", "decoder.layers.0.mlp"}
    assert [b.label for b in model.memcompile_report.converted] == ["encoder.1", "decoder.0"]
    assert model(x).shape == x.shape
    # the other blocks are still FFNs with their labels
    left = [b.index for b in memcompile.find_ffn_blocks(model)]
    assert left == ["encoder.0", "encoder.2", "decoder.1", "decoder.2", "decoder.3"]


@pytest.mark.parametrize("layers", [[2, 0], ["2", "0"], [2, "0"]])
def test_int_and_numeric_string_layers_select_the_same_blocks(layers):
    model = build("gelu_module")
    _, report = memcompile.transform(model, layers, return_report=True, **SMALL)
    assert [b.path for b in report.converted] == ["layers.2.mlp", "layers.0.mlp"]
    assert isinstance(model.layers[2].mlp, memcompile.MemoryLayer)
    assert isinstance(model.layers[0].mlp, memcompile.MemoryLayer)
    assert isinstance(model.layers[1].mlp, MLP) and isinstance(model.layers[3].mlp, MLP)


# ---------------------------------------------------------------- augment mode is exact


@pytest.mark.parametrize("name", list(PATTERNS))
def test_augment_keeps_outputs_bit_identical(name):
    model = build(name)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    result, report = memcompile.transform(model, mode="augment", return_report=True, **SMALL)
    assert result is model
    assert len(report.converted) == 4
    memories = [m for m in model.modules() if isinstance(m, memcompile.MemoryLayer)]
    assert len(memories) == 4
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    # the memory is live: training its output projection changes the model
    with torch.no_grad():
        for memory in memories:
            memory.out.weight.fill_(0.01)
        assert not torch.equal(before, model(x))


def test_ffns_in_the_roots_own_graph_count_from_0():
    """A flat nn.Sequential holds two FFNs in its own graph (no module path): blocks 0, 1."""
    model = nn.Sequential(
        nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D), nn.LayerNorm(D),
        nn.Linear(D, H), nn.GELU(), nn.Linear(H, D),
    )  # fmt: skip
    blocks = memcompile.find_ffn_blocks(model)
    assert [(b.index, b.path, b.activation) for b in blocks] == [(0, "", "relu"), (1, "", "gelu")]
    x = torch.randn(3, D)
    with torch.no_grad():
        before = model(x)
    memcompile.transform(model, layers=[1], mode="augment", **SMALL)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert model.memcompile_report.converted[0].activation == "gelu"


# symbolic_trace traces into transformers' Conv1D (not a torch.nn leaf): no projection node
WHOLE_GRAPH = [name for name in PATTERNS if name != "gpt2_conv1d"]


@pytest.mark.parametrize("name", WHOLE_GRAPH)
def test_whole_model_graph_module_is_searched_and_augmented_exactly(name):
    _, kind, activation, path = PATTERNS[name]
    if name == "split_bert":  # one graph: the FFN's projections meet in the layer
        kind, path = "mlp", "layers.{}"
    model = build(name)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    gm = fx.symbolic_trace(model)
    blocks = memcompile.find_ffn_blocks(gm)
    assert [(b.index, b.path, b.kind, b.activation, b.d_model, b.d_hidden) for b in blocks] == [
        (i, path.format(i), kind, activation, D, H) for i in range(4)
    ]
    result = memcompile.transform(gm, mode="augment", **SMALL)
    assert result is gm
    assert sum(isinstance(m, memcompile.MemoryLayer) for m in gm.modules()) == 4
    with torch.no_grad():
        assert torch.equal(gm(x), before)
