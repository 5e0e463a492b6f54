"""Row-sparse value gradients (`memcompile.sparse_value_grads`): the sparse gradient against
the dense one autograd gives without them, optimizers that take sparse gradients against
the same optimizers on the dense gradient, and the paths that must not change."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from torch import nn

import memcompile
from memcompile import MemcompileError
from memcompile.kernels import cpu

from models import CASES, VOCAB, build

pytestmark = pytest.mark.usefixtures("one_thread")
LLAMA = next(c for c in CASES if c.name == "llama")
SMALL = dict(mem_size=256, knn=4, heads=2)


def _pair(dtype=torch.float32, **options):
    """A converted Llama (blocks 0 and 2 read one pool) and a copy with sparse gradients."""
    dense = memcompile.transform(build(LLAMA), layers=[0, 2], **{**SMALL, **options}).to(dtype)
    sparse = copy.deepcopy(dense)
    return dense, sparse, memcompile.sparse_value_grads(sparse)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))


def _backward(model: nn.Module, *seeds: int) -> None:
    for seed in seeds:
        LLAMA.loss(model, _ids(seed)).backward()


@pytest.mark.parametrize("pytorch_only", [False, True], ids=["cpp-kernels", "pytorch"])
def test_the_sparse_gradient_holds_the_dense_one_on_the_touched_rows(pytorch_only):
    dense, sparse, _ = _pair()
    with cpu.pytorch_only() if pytorch_only else torch.enable_grad():
        _backward(dense, 0, 1)  # two micro-batches: the gradients add up
        _backward(sparse, 0, 1)
    grad, want = sparse.memcompile_pool.values.grad, dense.memcompile_pool.values.grad
    assert grad.is_sparse and grad.layout == torch.sparse_coo
    touched = grad.coalesce().indices()[0]
    assert len(touched) < grad.shape[0]  # a few rows, not the table
    assert torch.count_nonzero(want.abs().sum(1)) <= len(touched)
    torch.testing.assert_close(grad.to_dense(), want, rtol=1e-5, atol=1e-7)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        if "values" not in name:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_own_tables_and_bfloat16_values_get_sparse_gradients_too():
    dense, sparse, handle = _pair(torch.bfloat16, share_values=False)
    assert len(handle.owners) == 2
    _backward(dense, 0)
    _backward(sparse, 0)
    tables = [(n, p) for n, p in sparse.named_parameters() if n.endswith(".values")]
    assert len(tables) == 2
    for name, values in tables:
        assert values.grad.is_sparse and values.grad.dtype == torch.bfloat16
        want = dense.get_parameter(name).grad
        torch.testing.assert_close(values.grad.to_dense(), want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_optimizers_step_on_the_sparse_gradient_as_on_the_dense_one(optimizer):
    """Adagrad and momentum-free SGD change no row that a dense gradient has zero in, so
    their sparse and dense steps agree (Adagrad's first steps are about lr * sign(grad), so
    float noise of the rest of the model grows: 1e-5 after three steps)."""
    dense, sparse, _ = _pair()
    make = {"adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.5)}[optimizer]  # fmt: skip
    optimizers = [make(dense.parameters()), make(sparse.parameters())]
    for step in range(3):
        for model, opt in zip((dense, sparse), optimizers):
            opt.zero_grad()
            _backward(model, step)
            opt.step()
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)


def test_sparse_adam_steps_the_touched_rows_as_lazy_adam_in_float64():
    dense, sparse, _ = _pair()
    values = sparse.memcompile_pool.values
    start = values.detach().double().clone()
    m, v = torch.zeros_like(start), torch.zeros_like(start)
    lr, (b1, b2), eps = 0.01, (0.9, 0.999), 1e-8
    opt = torch.optim.SparseAdam([values], lr=lr, betas=(b1, b2), eps=eps)
    expected = start.clone()
    for step in range(1, 4):
        opt.zero_grad()
        _backward(sparse, step)
        grad = values.grad.coalesce()
        rows, g = grad.indices()[0], grad.values().double()
        m[rows] = b1 * m[rows] + (1 - b1) * g
        v[rows] = b2 * v[rows] + (1 - b2) * g * g
        step_size = lr * (1 - b2**step) ** 0.5 / (1 - b1**step)  # SparseAdam's: eps unscaled
        expected[rows] -= step_size * m[rows] / (v[rows].sqrt() + eps)
        opt.step()
    torch.testing.assert_close(values.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(values.detach().double(), start)


def test_inference_and_export_take_the_usual_path():
    dense, sparse, handle = _pair()
    ids = _ids(5)
    with torch.no_grad():
        assert torch.equal(LLAMA.logits(sparse, ids), LLAMA.logits(dense, ids))
    layer = next(m for m in sparse.modules() if isinstance(m, memcompile.MemoryLayer))
    program = torch.export.export(layer.eval(), (torch.randn(2, 5, layer.d_in),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "memcompile.bag.default" in targets
    handle.remove()
    _backward(sparse, 0)
    assert not sparse.memcompile_pool.values.grad.is_sparse


def test_a_copy_is_taken_over_and_other_bag_impls_are_refused_both_ways():
    _, sparse, handle = _pair()
    copied = pickle.loads(pickle.dumps(sparse))  # sparse, and no handle of its own
    memcompile.sparse_value_grads(copied).remove()
    _backward(copied, 0)
    assert not copied.memcompile_pool.values.grad.is_sparse
    with pytest.raises(MemcompileError, match="already has a bag_impl"):
        memcompile.fuse_value_updates(sparse, "adam", 0.1)
    handle.remove()
    fused = memcompile.fuse_value_updates(sparse, "adam", 0.1)
    with pytest.raises(MemcompileError, match="fused updates"):
        memcompile.sparse_value_grads(sparse)
    fused.remove()
    with pytest.raises(MemcompileError, match="no memory value tables"):
        memcompile.sparse_value_grads(build(LLAMA))


def test_param_groups_warns_that_adamw_refuses_sparse_gradients(caplog):
    _, sparse, _ = _pair()
    with caplog.at_level(logging.WARNING, logger="memcompile.training"):
        groups = memcompile.param_groups(sparse, lr=1e-3)
    assert "give the 'memory_values' group to an optimizer that takes them" in caplog.text
    assert [g["name"] for g in groups] == ["default", "memory_values"]
