"""The C++ CPU kernels of the differentiable ops (kernels/training_kernels.cc): pk_topk's
forward against a float64 top-k over all n_keys**2 full keys, bag_backward against float64
gradients built from a dense weight matrix, and a training step against PyTorch alone."""

from __future__ import annotations

import pytest
import torch
from test_ops import brute_topk, dense_weights

from memcompile.kernels import cpu, native, ops
from memcompile.runtime import MemoryConfig, MemoryLayer

F64 = torch.float64


@pytest.fixture(autouse=True)
def _kernel_built():
    assert cpu._native(), "a C++17 compiler is on the test machine"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tokens,heads,n_keys,half,knn", [
    (1, 1, 8, 4, 1), (7, 2, 12, 6, 4), (33, 3, 40, 8, 16), (5, 2, 16, 4, 16),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pk_topk_matches_a_float64_brute_force(tokens, heads, n_keys, half, knn, dtype):
    """Scores in float32 for either dtype (bfloat16 queries and keys read as they are)."""
    g = _gen(tokens + knn)
    q = torch.randn(tokens, heads, 2 * half, generator=g).to(dtype)
    keys = torch.randn(heads, 2, n_keys, half, generator=g).to(dtype)
    calls = native.call_count("training")
    scores, rows = ops.pk_topk(q, keys, knn)
    assert native.call_count("training") == calls + 1
    expected_scores, expected_rows = brute_topk(q, keys, knn)
    assert scores.dtype == torch.float32 and rows.dtype == torch.int64
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(scores.to(F64), expected_scores, rtol=1e-5, atol=1e-5)


def _float64_bag_gradients(grad_out, values, indices, weights):
    """dL/dvalues = W^T g and dL/dweights[n, b] = values[indices[n, b]] . g[n], in float64,
    W the (N, rows) matrix of the bag's weights (repeated picks summed)."""
    dense = dense_weights(indices, weights, values.shape[0])
    grad_values = dense.T @ grad_out.to(F64)
    grad_weights = torch.einsum("nbv,nv->nb", values.to(F64)[indices], grad_out.to(F64))
    return grad_values, grad_weights


@pytest.mark.parametrize("tokens,picks,v_dim", [(1, 1, 96), (9, 8, 320), (40, 12, 16)])
@pytest.mark.parametrize("repeated", [False, True])
def test_bag_backward_matches_float64(tokens, picks, v_dim, repeated):
    """Random picks, or one row picked by every token (and twice by some): each pair's
    share of the row's gradient is added, none lost."""
    g = _gen(tokens * picks)
    values = torch.randn(50, v_dim, generator=g)
    indices = torch.randint(0, 50, (tokens, picks), generator=g)
    if repeated:
        indices[:, 0] = 7
        indices[::2, -1] = 7
    weights = torch.rand(tokens, picks, generator=g)
    grad_out = torch.randn(tokens, v_dim, generator=g)
    calls = native.call_count("training")
    grad_values, grad_weights = ops.bag_backward(grad_out, values, indices, weights)
    assert native.call_count("training") == calls + 1
    expected_values, expected_weights = _float64_bag_gradients(grad_out, values, indices, weights)
    torch.testing.assert_close(grad_values.to(F64), expected_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weights.to(F64), expected_weights, rtol=1e-5, atol=1e-5)


def test_bag_backward_of_bags_of_no_picks_is_zero():
    values, grad_out = torch.randn(50, 16), torch.randn(3, 16)
    empty = torch.zeros(3, 0, dtype=torch.int64)
    grad_values, grad_weights = ops.bag_backward(grad_out, values, empty, torch.zeros(3, 0))
    assert torch.equal(grad_values, torch.zeros(50, 16)) and grad_weights.shape == (3, 0)


def test_bag_backward_gives_the_same_bits_on_any_thread_count():
    g = _gen(3)
    values = torch.randn(64, 200, generator=g)
    indices = torch.randint(0, 8, (128, 16), generator=g)  # 8 hot rows: long sums per row
    weights, grad_out = torch.rand(128, 16, generator=g), torch.randn(128, 200, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.bag_backward(grad_out, values, indices, weights)
        torch.set_num_threads(2)
        two = ops.bag_backward(grad_out, values, indices, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("change", ["index past the table", "negative index", "float64"])
def test_what_the_kernel_does_not_take_runs_the_reference(change):
    g = _gen(5)
    values, weights = torch.randn(10, 16, generator=g), torch.rand(3, 4, generator=g)
    indices, grad_out = torch.randint(0, 10, (3, 4), generator=g), torch.randn(3, 16, generator=g)
    calls = native.call_count("training")
    if change == "float64":
        values, weights, grad_out = values.double(), weights.double(), grad_out.double()
        grad_values, _ = ops.bag_backward(grad_out, values, indices, weights)
        expected, _ = _float64_bag_gradients(grad_out, values, indices, weights)
        torch.testing.assert_close(grad_values, expected)
    else:
        indices[1, 2] = 10 if change == "index past the table" else -11
        with pytest.raises((IndexError, RuntimeError)):  # the reference refuses it
            ops.bag_backward(grad_out, values, indices, weights)
    assert native.call_count("training") == calls


def test_a_training_step_matches_pytorch_alone(monkeypatch):
    """One Memory+ layer's loss and every parameter's gradient, with the C++ kernels and
    with the PyTorch references alone (as where no compiler built them)."""
    layer = MemoryLayer(48, 48, MemoryConfig(mem_size=16**2, heads=2, knn=8, k_dim=32))
    x = torch.randn(2, 24, 48, generator=_gen(0))

    def step():
        layer.zero_grad()
        loss = layer(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    calls = native.call_count("training")
    loss, grads = step()
    assert native.call_count("training") == calls + 2  # pk_topk and bag_backward
    monkeypatch.setattr(cpu, "_kernels", False)
    expected_loss, expected_grads = step()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
