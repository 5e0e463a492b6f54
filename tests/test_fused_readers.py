"""Fused value updates when a step has several lookups or backward passes: a pool read by
two layers, activation checkpointing, gradient accumulation, a discarded lookup, a second
backward, and the `step_with` guard, each against an unfused or float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from fused_reference import (
    EXAMPLE,
    SMALL,
    Reference,
    assert_close64,
    dense_gradient,
    fused_step,
    make_batch,
    pool_model,
    token_ids,
)
from torch import nn

import memcompile
from memcompile import MemcompileError
from memcompile.kernels import ops
from memcompile.runtime.fused_table import FusedTable, ValueOptimizer

from models import build

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shared_pool_gets_one_step_with_the_summed_gradient():
    model = pool_model()
    dense = copy.deepcopy(model)
    seen = []

    def recorder(values, indices, weights):  # the unfused twin: record which rows are read
        seen.append(indices)
        return ops.bag(values, indices, weights)

    dense.memcompile_pool.bag_impl = recorder
    EXAMPLE.loss(dense, token_ids(0)).backward()
    assert len(seen) == 2
    ref = Reference(model.memcompile_pool.values, "adam", 0.02, weight_decay=0.1)
    touched = torch.zeros(256, dtype=torch.bool)
    touched[torch.cat(seen).reshape(-1)] = True
    ref.step(dense.memcompile_pool.values.grad.double(), touched)

    handle = memcompile.fuse_value_updates(model, "adam", 0.02, weight_decay=0.1)
    EXAMPLE.loss(model, token_ids(0)).backward()
    assert handle.step == 1 and model.memcompile_pool.values.grad is None
    assert_close64(model.memcompile_pool.values.detach(), ref.w)
    for (name, p), q in zip(model.named_parameters(), dense.parameters()):
        if name != "memcompile_pool.values":  # every other gradient as without fusion
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


class _TwoReaders(nn.Module):
    """Two memory layers reading one pool, each in its own residual block, optionally under
    activation checkpointing (`reentrant`: None for none, else torch's use_reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        config = memcompile.MemoryConfig(mem_size=256, heads=2, knn=4, k_dim=8)
        self.pool = memcompile.runtime.MemoryPool(256, 16, seed=3)
        self.blocks = nn.ModuleList(memcompile.MemoryLayer(16, 16, config) for _ in range(2))
        for block in self.blocks:
            block.attach_pool(self.pool)
        self.reentrant: bool | None = None

    def forward(self, x):
        for block in self.blocks:
            if self.reentrant is None:
                x = x + block(x)
            else:
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_activation_checkpointing_gives_one_step_as_without_it(reentrant, accumulation_steps):
    """Reentrant checkpointing runs a backward pass per segment, each recomputing its
    lookup: the update still waits for the whole backward (one step, on rows as read)."""
    torch.manual_seed(0)
    plain = _TwoReaders()
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    for model in (plain, checkpointed):
        handle = memcompile.fuse_value_updates(
            model, "rowwise_adagrad", 0.1, accumulation_steps=accumulation_steps
        )
        for micro_batch in range(accumulation_steps):
            model(x).square().sum().backward()
            assert handle.step == (micro_batch + 1) // accumulation_steps
    torch.testing.assert_close(plain.pool.values, checkpointed.pool.values, rtol=0, atol=1e-6)
    assert not torch.equal(plain.pool.values, _TwoReaders().pool.values)  # a step was taken
    for p, q in zip(plain.blocks.parameters(), checkpointed.blocks.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_a_second_backward_through_one_step_is_one_line():
    model = pool_model()
    memcompile.fuse_value_updates(model, "rowwise_adagrad", 0.05)
    loss = EXAMPLE.loss(model, token_ids(0))
    loss.backward(retain_graph=True)
    with pytest.raises(MemcompileError, match="a second backward through one forward") as error:
        loss.backward()
    assert "\n" not in str(error.value)


def test_a_discarded_lookup_takes_the_buffered_path_with_the_same_result():
    twins = [nn.Parameter(torch.randn(30, 8)) for _ in range(2)]
    twins[1].data.copy_(twins[0].data)
    tables = [FusedTable(v, ValueOptimizer("adam", 0.01)) for v in twins]
    idx, w, go = make_batch(30, 8, 5)
    grads = [fused_step(tables[0], idx, w, go)]  # the only reader: update inside its backward
    tables[1].bag(twins[1], idx, w.clone().requires_grad_())  # graph dropped, never used
    with torch.no_grad():
        tables[1].bag(twins[1], idx, w)  # does not count
    grads.append(fused_step(tables[1], idx, w, go))  # two lookups seen: end-of-backward update
    assert torch.equal(twins[0], twins[1]) and torch.equal(*grads)
    assert tables[0].step == tables[1].step == 1


def test_accumulation_steps_step_once_on_the_summed_micro_batches():
    values = nn.Parameter(torch.randn(25, 6))
    table = FusedTable(values, ValueOptimizer("rowwise_adagrad", 0.1, accumulation_steps=2))
    ref = Reference(values, "rowwise_adagrad", 0.1)
    before = values.detach().clone()
    micro = [make_batch(25, 6, seed) for seed in (7, 8)]
    fused_step(table, *micro[0])
    assert torch.equal(values.detach(), before) and table.step == 0
    with pytest.raises(MemcompileError, match="middle of an accumulation window"):
        table.state_dict()  # the buffered micro-batch is not state: a resume would lose it
    fused_step(table, *micro[1])
    assert table.step == 1
    ref.step(*dense_gradient(25, micro))
    assert_close64(values.detach(), ref.w)


@pytest.mark.parametrize("layers", [[1], [0, 2]], ids=["one-reader", "shared"])
def test_step_with_refuses_a_second_backward_before_the_optimizer_steps(layers):
    model = build(EXAMPLE)
    memcompile.transform(model, layers=layers, **SMALL)
    optimizer = torch.optim.SGD(memcompile.param_groups(model, 1e-3), lr=1e-3)
    memcompile.fuse_value_updates(model, "adam", 1e-2, step_with=optimizer)
    for seed in range(2):
        EXAMPLE.loss(model, token_ids(seed)).backward()
        optimizer.step()
    EXAMPLE.loss(model, token_ids(2)).backward()
    with pytest.raises(MemcompileError, match="second backward before optimizer.step"):
        EXAMPLE.loss(model, token_ids(3)).backward()


def test_step_with_refuses_an_optimizer_step_inside_an_accumulation_window():
    model = memcompile.transform(build(EXAMPLE), layers=[1], **SMALL)
    optimizer = torch.optim.SGD(memcompile.param_groups(model, 1e-3), lr=1e-3)
    handle = memcompile.fuse_value_updates(
        model, "adam", 1e-2, accumulation_steps=2, step_with=optimizer
    )
    for seed in range(4):  # two declared windows of two micro-batches
        EXAMPLE.loss(model, token_ids(seed)).backward()
        if seed % 2:
            optimizer.step()
    assert handle.step == 2
    EXAMPLE.loss(model, token_ids(4)).backward()
    optimizer.step()  # after one micro-batch of two
    with pytest.raises(MemcompileError, match="ran between the micro-batches"):
        EXAMPLE.loss(model, token_ids(5)).backward()
    assert handle.step == 2
