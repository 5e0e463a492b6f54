"""Replace mode, value sharing, errors and the report, on the synthetic models of test_patterns.

Parameter counts are computed here from the module definitions and the MemoryConfig
(DESIGN.md, "The memory layer"), never read back from the code under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from test_patterns import MLP, SMALL, Block, D, Gated, H, Stack, build
from torch import nn

import memcompile
from memcompile import MemcompileError, MemoryLayer

HEADS, N_KEYS, K_DIM = SMALL["heads"], 16, 16  # mem_size 256 = 16**2; k_dim = min(512, D)

# FFN parameters per layer, from the definitions in test_patterns
LINEAR_PAIR = D * H + H + H * D + D
FFN_PARAMS = {
    "gelu_module": LINEAR_PAIR,
    "gpt2_conv1d": LINEAR_PAIR,
    "swiglu": 2 * (D * H + H) + H * D + D,
    "fused_method_chunk": D * 2 * H + H * D,  # no biases
    "split_bert": LINEAR_PAIR,
    "inline_block": LINEAR_PAIR,
    "inline_weight_read": LINEAR_PAIR,
    "residual_input": LINEAR_PAIR,
    "t5_weight_check": 2 * D * H,  # no biases
}
# the path of the FFN's first projection in layer 1, which replace mode removes
FIRST_PROJECTION = {
    "gelu_module": "layers.1.mlp.fc1.weight",
    "gpt2_conv1d": "layers.1.mlp.c_fc.weight",
    "swiglu": "layers.1.mlp.gate.weight",
    "fused_method_chunk": "layers.1.mlp.gate_up.weight",
    "split_bert": "layers.1.intermediate.dense.weight",
    "inline_block": "layers.1.fc1.weight",
    "inline_weight_read": "layers.1.fc2.weight",
    "residual_input": "layers.1.mlp.dense_h_to_4h.weight",
    "t5_weight_check": "layers.1.mlp.wo.weight",
}


def memory_params(d_in: int, d_out: int, v_dim: int, with_values: bool) -> int:
    query = d_in * HEADS * K_DIM + HEADS * K_DIM
    keys = HEADS * 2 * N_KEYS * (K_DIM // 2)
    swilu = d_in * v_dim + v_dim
    out = v_dim * d_out + d_out
    return query + keys + swilu + out + (N_KEYS**2 * v_dim if with_values else 0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def memories(model: nn.Module) -> list[MemoryLayer]:
    return [m for m in model.modules() if isinstance(m, MemoryLayer)]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- replace mode


# symbolic_trace traces into transformers' Conv1D (no projection node to match), so the
# Conv1D MLP is only converted module by module.
GRAPH_CASES = [
    (name, whole_graph)
    for name in FFN_PARAMS
    for whole_graph in (False, True)
    if not (whole_graph and name == "gpt2_conv1d")
]


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize(("name", "whole_graph"), GRAPH_CASES)
def test_replace_removes_ffn_params_and_adds_exactly_the_memory(name, share, whole_graph):
    model = build(name)
    if whole_graph:
        model = fx.symbolic_trace(model)
    x = torch.randn(2, 5, D)
    before = n_params(model)
    names_before = set(model.state_dict())
    _, report = memcompile.transform(model, [1, 3], share_values=share, return_report=True, **SMALL)
    added = 2 * memory_params(D, D, D, with_values=not share) + (N_KEYS**2 * D if share else 0)
    assert n_params(model) == before - 2 * FFN_PARAMS[name] + added
    assert (report.params_before, report.params_after) == (before, n_params(model))
    assert report.ffn_params_removed == 2 * FFN_PARAMS[name]
    assert report.memory_params_added == added

    params, state = dict(model.named_parameters()), set(model.state_dict())
    removed = FIRST_PROJECTION[name]
    assert removed in names_before and removed not in params and removed not in state
    assert removed.replace("layers.1", "layers.0") in params  # layer 0 untouched
    prefix = removed.split(".")[0] + "." + removed.split(".")[1]
    new = {n for n in params if n.startswith(prefix) and n not in names_before}
    assert any(n.endswith(".query.weight") for n in new) and any(n.endswith(".keys") for n in new)
    assert ("memcompile_pool.values" in params) == share
    assert any(n.endswith(".values") and n.startswith(prefix) for n in params) == (not share)
    with torch.no_grad():
        out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["gelu_module", "split_bert", "inline_block"])
def test_replaced_model_trains_and_memory_values_get_gradients(name):
    model = build(name).train()
    memcompile.transform(model, **SMALL)
    generator = torch.Generator().manual_seed(3)
    x, target = torch.randn(4, 6, D, generator=generator), torch.randn(4, 6, D, generator=generator)
    values = model.memcompile_pool.values
    start = values.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        if step == 0:
            assert values.grad is not None and values.grad.abs().sum() > 0
            touched = (values.grad.abs().sum(-1) > 0).sum().item()
            assert 0 < touched < N_KEYS**2  # sparse: only the rows looked up
            for memory in memories(model):
                assert memory.query.weight.grad.abs().sum() > 0
                assert memory.keys.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(values.detach(), start)


def test_augment_memory_trains_from_zero_output():
    model = build("swiglu").train()
    memcompile.transform(model, [0], mode="augment", **SMALL)
    (memory,) = memories(model)
    x = torch.randn(2, 5, D)
    model(x).pow(2).mean().backward()
    assert memory.out.weight.grad.abs().sum() > 0  # the zero output can learn


# ---------------------------------------------------------------- value sharing


def test_shared_values_are_one_table_read_by_every_layer():
    model = build("gelu_module")
    memcompile.transform(model, [0, 2], **SMALL)
    value_names = [n for n, _ in model.named_parameters() if "values" in n]
    assert value_names == ["memcompile_pool.values"]
    table = model.memcompile_pool.values
    assert tuple(table.shape) == (N_KEYS**2, D)
    assert all(m.value_table is table for m in memories(model))
    assert [n for n in model.state_dict() if "values" in n] == ["memcompile_pool.values"]


def test_second_transform_reuses_the_pool():
    model = build("swiglu")
    memcompile.transform(model, [0], **SMALL)
    pool = model.memcompile_pool
    before = n_params(model)
    memcompile.transform(model, [2, 3], **SMALL)
    assert model.memcompile_pool is pool
    assert [n for n, _ in model.named_parameters() if "values" in n] == ["memcompile_pool.values"]
    assert len(memories(model)) == 3
    assert all(m.value_table is pool.values for m in memories(model))
    removed = 2 * (2 * (D * H + H) + H * D + D)
    assert n_params(model) == before - removed + 2 * memory_params(D, D, D, with_values=False)


def test_unshared_values_give_a_table_per_layer():
    model = build("gelu_module")
    memcompile.transform(model, [0, 1], share_values=False, **SMALL)
    assert not hasattr(model, "memcompile_pool")
    names = sorted(n for n, _ in model.named_parameters() if "values" in n)
    assert names == ["layers.0.mlp.values", "layers.1.mlp.values"]
    a, b = (m.value_table for m in memories(model))
    assert a.data_ptr() != b.data_ptr() and not torch.equal(a, b)


class Wide(nn.Module):
    """An FFN of width 24 next to the width-16 ones: its default v_dim differs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(24, 40), nn.Linear(40, 24)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def mixed_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([Block(MLP(nn.GELU())), Block(MLP(nn.GELU()))])
    model.wide = nn.ModuleList([Wide()])
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not memories(model)


def test_sharing_mismatched_v_dims_raises_and_leaves_the_model_alone():
    model = mixed_model()
    before = snapshot(model)
    with pytest.raises(MemcompileError, match="share_values=False") as error:
        memcompile.transform(model, **SMALL)
    assert "\n" not in str(error.value)
    assert_unchanged(model, before)
    # the fixes the message offers both work
    memcompile.transform(mixed_model(), share_values=False, **SMALL)
    fixed = mixed_model()
    memcompile.transform(fixed, v_dim=16, **SMALL)
    assert tuple(fixed.memcompile_pool.values.shape) == (N_KEYS**2, 16)
    assert fixed.wide[0](torch.randn(3, 24)).shape == (3, 24)


def test_second_transform_with_another_v_dim_raises_and_leaves_the_model_alone():
    model = build("gelu_module")
    memcompile.transform(model, [0], **SMALL)
    before = snapshot(model)
    with pytest.raises(MemcompileError, match="shared value table"):
        memcompile.transform(model, [1], v_dim=8, **SMALL)
    after = model.state_dict()
    assert list(after) == list(before) and len(memories(model)) == 1
    assert isinstance(model.layers[1].mlp, MLP)


# ---------------------------------------------------------------- errors and the report


@pytest.mark.parametrize(
    ("layers", "pattern"),
    [
        ([7], r"layer 7 is not an FFN block .*valid layers are 0-3"),
        ([1, 1], "layer 1 is listed twice"),
        ([1, "1"], "layer 1 is listed twice"),
        (["mlp"], r"layer mlp is not an FFN block .*0-3"),
        (["encoder.1"], "layer encoder.1 is not an FFN block"),
        ([], r"no layers given: choose from 0-3"),
        (["1-2"], r"ranges are the command line's --layers syntax; in Python pass range\(1, 3\)"),
    ],
)
def test_bad_layers_raise_one_line_errors_before_touching_the_model(layers, pattern):
    model = build("gelu_module")
    before = snapshot(model)
    with pytest.raises(MemcompileError, match=pattern) as error:
        memcompile.transform(model, layers, **SMALL)
    assert "\n" not in str(error.value)
    assert_unchanged(model, before)


def test_valid_layers_are_listed_when_not_a_range():
    model = nn.Module()
    model.layers = nn.ModuleList(Block(MLP(nn.GELU())) for _ in range(2))
    with pytest.raises(MemcompileError, match="valid layers are 0, 1$"):
        memcompile.transform(model, [2], **SMALL)


def test_model_without_ffn_raises():
    model = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D))
    assert memcompile.find_ffn_blocks(model) == []
    with pytest.raises(MemcompileError, match="no FFN blocks found in Sequential") as error:
        memcompile.transform(model, **SMALL)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["gelu_module", "split_bert", "inline_block"])
@pytest.mark.parametrize("mode", ["replace", "augment"])
def test_new_modules_take_the_train_or_eval_mode_of_what_they_replace(name, mode):
    for training in (False, True):
        model = build(name).train(training)
        memcompile.transform(model, [0, 2], mode=mode, **SMALL)
        assert {m.training for m in model.modules()} == {training}


def test_report_counts_found_and_converted_blocks():
    model = build("gelu_module")
    result = memcompile.transform(model, [3, 1], **SMALL)
    report = model.memcompile_report
    assert result is model
    assert [b.index for b in report.blocks_found] == [0, 1, 2, 3]
    assert [b.index for b in report.converted] == [3, 1]
    assert report.config.mode == "replace" and report.config.heads == HEADS
    assert "4 FFN blocks found, 2 converted (3, 1)" in report.summary()
    second, again = memcompile.transform(model, [0], mode="replace", return_report=True, **SMALL)
    assert second is model and again is model.memcompile_report
    assert [b.index for b in again.blocks_found] == [0, 2]
    assert [b.index for b in again.converted] == [0]


@pytest.mark.parametrize("mode", ["replace", "augment"])
@pytest.mark.parametrize("name", ["gelu_module", "swiglu", "split_bert", "inline_block"])
def test_converted_blocks_are_not_found_again(name, mode):
    model = build(name)
    memcompile.transform(model, [0, 2], mode=mode, **SMALL)
    assert [b.index for b in memcompile.find_ffn_blocks(model)] == [1, 3]
    memcompile.transform(model, mode=mode, **SMALL)  # the rest
    assert memcompile.find_ffn_blocks(model) == []
    assert len(memories(model)) == 4
    with pytest.raises(MemcompileError, match=r"all are memory layers already \(4 converted"):
        memcompile.transform(model, mode=mode, **SMALL)


@pytest.mark.parametrize("mode", ["replace", "augment"])
def test_converted_blocks_of_a_whole_model_graph_are_not_found_again(mode):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Stack(lambda: Gated(F.silu), n=3).eval())
    memcompile.transform(gm, [1], mode=mode, **SMALL)
    assert [b.index for b in memcompile.find_ffn_blocks(gm)] == [0, 2]
    memcompile.transform(gm, mode=mode, **SMALL)
    assert memcompile.find_ffn_blocks(gm) == []
    assert len(memories(gm)) == 3
    assert [n for n, _ in gm.named_parameters() if "values" in n] == ["memcompile_pool.values"]


# ---------------------------------------------------------------- graph rewrite keeps the module


class DropoutBlock(nn.Module):
    """An inline FFN (graph-rewrite path) with functional dropout on `self.training`, a child
    the forward never calls and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, H), nn.Linear(H, D)
        self.spare = nn.Linear(D, 4)  # not used by forward
        self.register_buffer("scale", torch.full((D,), 0.5), persistent=False)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(self.ln(x))))
        return x + self.scale * F.dropout(h, p=0.5, training=self.training)


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(DropoutBlock() for _ in range(2))
    model.forward = lambda x: model.layers[1](model.layers[0](x))
    return model


@pytest.mark.parametrize("train_first", [False, True])
def test_graph_rewrite_follows_train_and_eval_mode(train_first):
    model = dropout_model()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        reference = model.eval()(x)
    model.train(train_first)  # the mode the model is in when transformed
    memcompile.transform(model, mode="augment", **SMALL)
    assert all(isinstance(layer, fx.GraphModule) for layer in model.layers)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference)
        model.train()
        assert not torch.equal(model(x), model(x))  # dropout is active again
        assert torch.equal(model.eval()(x), reference)


def test_graph_rewrite_keeps_unused_children_and_buffer_persistence():
    model = dropout_model().eval()
    params, keys = n_params(model), set(model.state_dict())
    _, report = memcompile.transform(model, mode="augment", return_report=True, **SMALL)
    added = 2 * memory_params(D, D, D, with_values=False) + N_KEYS**2 * D
    assert n_params(model) == params + added and report.memory_params_added == added
    assert "layers.0.spare.weight" in dict(model.named_parameters())
    new_keys = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert all(
        k.startswith(("layers.0.memory.", "layers.1.memory.", "memcompile_pool.")) for k in new_keys
    )
    assert "layers.0.scale" not in model.state_dict()  # still non-persistent


# ---------------------------------------------------------------- rewrite strategies, seeds


class GatedInlineWithOption(nn.Module):
    """A gated FFN inside a forward that takes an optional argument: its traced graph would
    be right for the default call only, so it cannot replace the module."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x, scale=None):
        h = F.silu(self.gate(x)) * self.up(x)
        y = x + self.down(h)
        return y if scale is None else y * scale


class InlineWithKwargs(nn.Module):
    """OPT's layout: fc1 -> act -> fc2 children inside a forward with **kwargs."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.act = nn.LayerNorm(D), nn.Linear(D, H), nn.ReLU()
        self.fc2 = nn.Linear(H, D)

    def forward(self, x, mask=None, **kwargs):
        if mask is not None:
            x = x * mask
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def test_inline_ffn_in_a_forward_with_options_swaps_its_children():
    torch.manual_seed(0)
    model = nn.Sequential(InlineWithKwargs(), InlineWithKwargs()).eval()
    x, mask = torch.randn(2, 5, D), torch.rand(2, 5, 1)
    expected = model[1](model[0](x, mask=mask, extra=1), mask=mask)
    memcompile.transform(model, [0, 1], mode="augment", **SMALL)
    assert type(model[0]) is InlineWithKwargs  # the forward is kept, with its options
    assert torch.equal(model[1](model[0](x, mask=mask, extra=1), mask=mask), expected)

    replaced = nn.Sequential(InlineWithKwargs(), InlineWithKwargs())
    memcompile.transform(replaced, [1], **SMALL)
    assert isinstance(replaced[1].fc1, MemoryLayer) and not hasattr(replaced[1].fc2, "weight")
    assert replaced[1](x, mask=mask).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_activation_with_a_scalar_parameter_is_found_in_half_precision(dtype):
    model = nn.Sequential(InlineWithKwargs(), InlineWithKwargs())
    for layer in model:
        layer.act = nn.PReLU()
    assert [b.index for b in memcompile.find_ffn_blocks(model.to(dtype))] == [0, 1]


def test_an_activation_with_a_scalar_parameter_is_found_and_replaced_with_its_ffn():
    torch.manual_seed(0)
    model = nn.Sequential(InlineWithKwargs(), InlineWithKwargs())
    for layer in model:
        layer.act = nn.PReLU()  # one learnable slope, like Apertus's xIELU
    assert [b.activation for b in memcompile.find_ffn_blocks(model)] == ["PReLU", "PReLU"]
    slope = model[1].act.weight
    ffn = [model[1].fc1.weight, model[1].fc1.bias, slope, model[1].fc2.weight, model[1].fc2.bias]
    _, report = memcompile.transform(model, [1], return_report=True, **SMALL)
    assert report.ffn_params_removed == sum(p.numel() for p in ffn)
    assert not any(p is slope for p in model.parameters())


def test_ffn_sharing_a_forward_with_options_is_refused_before_any_change():
    model = nn.Sequential(GatedInlineWithOption(), GatedInlineWithOption())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemcompileError, match="optional arguments") as error:
        memcompile.transform(model, [0, 1], **SMALL)
    assert "\n" not in str(error.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class InlineClampingHalf(nn.Module):
    """BART's encoder layout with the activation inline: a float16-only clamp after the FFN
    makes the traced graph right for the module's own dtype only."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        y = x + self.down(F.gelu(self.up(x)))
        if y.dtype == torch.float16:
            y = y.clamp(-1e4, 1e4)
        return y


def test_ffn_beside_a_dtype_branch_is_found_and_its_graph_rewrite_refused():
    model = nn.Sequential(InlineClampingHalf(), InlineClampingHalf())
    assert [b.index for b in memcompile.find_ffn_blocks(model)] == [0, 1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemcompileError, match="branches on the input's dtype") as error:
        memcompile.transform(model, [1], **SMALL)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is InlineClampingHalf for m in model)


class ClampingHalfIfInfinite(nn.Module):
    """BART's encoder layer: fc1/act/fc2 children, and a float16 branch whose condition
    (`isfinite(...).all()`) cannot be traced."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)

    def forward(self, x):
        y = x + self.fc2(self.act(self.fc1(x)))
        if y.dtype == torch.float16 and not torch.isfinite(y).all():
            y = y.clamp(-1e4, 1e4)
        return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocks_beside_a_dtype_branch_are_the_same_in_every_dtype(dtype):
    model = nn.Sequential(ClampingHalfIfInfinite(), ClampingHalfIfInfinite()).to(dtype)
    assert [b.index for b in memcompile.find_ffn_blocks(model)] == [0, 1]


def test_experts_without_a_router_are_no_moe_block():
    model = Stack(lambda: MLP(nn.GELU()), n=2)
    model.experts = nn.ModuleDict({"sentiment": nn.Linear(D, 2), "topic": nn.Linear(D, 5)})
    assert [b.index for b in memcompile.find_ffn_blocks(model)] == [0, 1]
    memcompile.transform(model, [1], **SMALL)
    assert isinstance(model.layers[1].mlp, MemoryLayer)


def test_a_block_gets_the_same_memory_whether_converted_alone_or_later():
    options = dict(SMALL, share_values=False)
    together = memcompile.transform(build("gelu_module"), [0, 1], **options)
    stepwise = memcompile.transform(build("gelu_module"), [0], **options)
    memcompile.transform(stepwise, [1], **options)
    assert together.state_dict().keys() == stepwise.state_dict().keys()
    for name, tensor in together.state_dict().items():
        assert torch.equal(tensor, stepwise.state_dict()[name]), name
    layers = memories(together)
    assert not torch.equal(layers[0].keys, layers[1].keys)  # each block its own stream


@pytest.mark.parametrize("whole_graph", [False, True], ids=["modules", "graph"])
def test_a_transform_that_fails_at_its_second_table_leaves_the_model_as_it_was(
    monkeypatch, whole_graph
):
    from memcompile.runtime import init

    model = build("gelu_module")
    if whole_graph:
        model = fx.symbolic_trace(model)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expected = model(x)
    before, code = snapshot(model), getattr(model, "code", None)
    built = []
    real = init.ValuesInit.materialize

    def second_fails(self, *args, **kwargs):  # as a table too large for memory would
        built.append(1)
        if len(built) == 2:
            raise MemcompileError("the value table does not fit in memory here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(init.ValuesInit, "materialize", second_fails)
    with pytest.raises(MemcompileError, match="does not fit"):
        memcompile.transform(model, [1, 3], share_values=False, **SMALL)
    assert len(built) == 2  # the first block had been converted when the second failed
    assert_unchanged(model, before)
    assert getattr(model, "code", None) == code
    assert not hasattr(model, "memcompile_recipe")
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    monkeypatch.undo()
    memcompile.transform(model, [1, 3], share_values=False, **SMALL)  # and converts again
    assert len(memories(model)) == 2


def test_transform_leaves_torchs_global_generator_where_it_was():
    model = build("gelu_module")  # which seeds the generator itself
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    memcompile.transform(model, [1, 3], **SMALL)
    assert torch.equal(torch.rand(3), expected)
