"""`memcompile.param_groups`: memory values in their own optimizer group, the rest unchanged."""

from __future__ import annotations

import pytest
import torch

import memcompile
from memcompile import MemcompileError, training

from models import CASES, build

EXAMPLE = next(c for c in CASES if c.name == "example")
LLAMA = next(c for c in CASES if c.name == "llama")
SMALL = dict(mem_size=256, knn=4, heads=2)


def _ids(case=EXAMPLE, seed=0):
    from models import VOCAB

    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_shared_pool_is_its_own_group_and_everything_else_is_kept(one_thread):
    model = build(EXAMPLE)
    memcompile.transform(model, layers=[0, 2], **SMALL)
    groups = _by_name(memcompile.param_groups(model, lr=3e-4, weight_decay=0.1, value_lr=2e-3))
    assert list(groups) == ["default", "memory_values"]

    values = groups["memory_values"]
    assert len(values["params"]) == 1
    assert values["params"][0] is model.memcompile_pool.values  # one shared table, once
    assert (values["lr"], values["weight_decay"]) == (2e-3, 0.0)

    default = groups["default"]
    assert (default["lr"], default["weight_decay"]) == (3e-4, 0.1)
    expected = {id(p) for n, p in model.named_parameters() if n != "memcompile_pool.values"}
    assert {id(p) for p in default["params"]} == expected
    assert len(default["params"]) == len(expected)  # no tensor twice
    # The memory layers' other parameters (query, keys, swilu, out) stay in the default group.
    layer = model.blocks[0].mlp
    assert isinstance(layer, memcompile.MemoryLayer)
    assert {id(layer.keys), id(layer.query.weight), id(layer.out.weight)} <= expected


def test_own_value_tables_and_augment_mode(one_thread):
    model = build(LLAMA)
    memcompile.transform(model, layers=[0], share_values=False, **SMALL)
    memcompile.transform(model, layers=[2], mode="augment", share_values=False, **SMALL)
    layers = [m for m in model.modules() if isinstance(m, memcompile.MemoryLayer)]
    assert len(layers) == 2 and not hasattr(model, "memcompile_pool")
    groups = _by_name(memcompile.param_groups(model, lr=1e-3))
    assert [id(p) for p in groups["memory_values"]["params"]] == [id(m.values) for m in layers]
    assert groups["default"]["weight_decay"] == 0.0


def test_dense_model_gets_one_group_and_frozen_parameters_are_left_out(one_thread):
    model = build(EXAMPLE)
    model.embed.weight.requires_grad_(False)
    groups = memcompile.param_groups(model, lr=1e-3, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["default"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in trainable]
    assert all(p is not model.embed.weight for p in groups[0]["params"])


def test_adamw_steps_values_at_value_lr_without_decay(one_thread):
    """Adam's first step moves every parameter with a gradient by lr * sign(grad) (its
    moments are g and g**2), plus decoupled weight decay lr * wd * p: the rates and decays
    each group really gets can be read off the update."""
    model = build(EXAMPLE)
    memcompile.transform(model, layers=[1], **SMALL)
    model.train()
    lr, wd, value_lr = 1e-3, 0.5, 3e-2
    optimizer = torch.optim.AdamW(memcompile.param_groups(model, lr, wd, value_lr), eps=1e-12)
    values, weight = model.memcompile_pool.values, model.blocks[1].attn.out_proj.weight
    before_values, before_weight = values.detach().clone(), weight.detach().clone()
    EXAMPLE.loss(model, _ids()).backward()
    grad_values, grad_weight = values.grad.clone(), weight.grad.clone()
    optimizer.step()

    read = (grad_values != 0).any(1)
    assert 0 < read.sum() < values.shape[0]  # a sparse set of rows was read
    assert torch.equal(values.detach()[~read], before_values[~read])  # no decay on the rest
    clear = grad_values.abs() > 1e-6  # (tinier gradients are within reach of eps)
    step = (values.detach() - before_values)[clear]
    torch.testing.assert_close(step, -value_lr * grad_values.sign()[clear], rtol=1e-4, atol=0)
    clear = grad_weight.abs() > 1e-6
    expected_weight = before_weight * (1 - lr * wd) - lr * grad_weight.sign()
    torch.testing.assert_close(weight.detach()[clear], expected_weight[clear], rtol=0, atol=1e-7)


def test_bad_arguments_and_lazy_tables(one_thread):
    model = build(EXAMPLE)
    memcompile.transform(model, layers=[1], lazy_init=True, **SMALL)
    with pytest.raises(MemcompileError, match="meta device"):
        memcompile.param_groups(model, lr=1e-3)
    memcompile.runtime.materialize_values(model)
    assert len(memcompile.param_groups(model, lr=1e-3)) == 2
    bad = [dict(lr=0.0), dict(lr=1e-3, value_lr=-1.0), dict(lr=1e-3, weight_decay=-0.1),
           dict(lr="1e-3"), dict(lr=None), dict(lr=1e-3, weight_decay=float("nan"))]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(MemcompileError):  # not a TypeError from a comparison
            memcompile.param_groups(model, **kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(MemcompileError, match="no trainable"):
        memcompile.param_groups(model, lr=1e-3)


def test_public_names():
    assert memcompile.param_groups is training.param_groups
    assert "param_groups" in memcompile.__all__
