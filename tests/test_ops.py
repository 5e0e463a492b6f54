"""The custom ops memcompile::pk_topk and memcompile::bag against brute-force references.

Every reference here is written independently of kernels/reference.py: pk_topk is checked
against a top-k over all n_keys**2 full keys [k1_i ; k2_j] built explicitly, bag against a
dense (N, rows) weight matrix, and gradients against float64 autograd of those references.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memcompile import kernels

ops, reference = kernels.ops, kernels.reference

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=F64, requires_grad=False) -> torch.Tensor:
    t = torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)
    return t.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- references


def full_keys(keys: torch.Tensor) -> torch.Tensor:
    """(H, n_keys**2, k_dim): row i*n_keys + j is [keys[h,0,i] ; keys[h,1,j]], built by loops."""
    heads, _, n_keys, _ = keys.shape
    rows = []
    for h in range(heads):
        per_head = []
        for i in range(n_keys):
            for j in range(n_keys):
                per_head.append(torch.cat([keys[h, 0, i], keys[h, 1, j]]))
        rows.append(torch.stack(per_head))
    return torch.stack(rows)


def brute_topk(q: torch.Tensor, keys: torch.Tensor, knn: int):
    """Exact top-knn over all n_keys**2 full keys, in float64 (differentiable)."""
    full = full_keys(keys.to(F64))
    scores = torch.einsum("nhd,hrd->nhr", q.to(F64), full)
    return scores.topk(knn, dim=-1, sorted=True)


def selected_scores(q: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Float64 scores q . full_key[index] for given indices (differentiable in q and keys)."""
    full = full_keys(keys.to(F64))  # (H, R, k_dim)
    heads = q.shape[1]
    picked = torch.stack([full[h][indices[:, h]] for h in range(heads)], dim=1)  # (N,H,knn,k)
    return torch.einsum("nhd,nhkd->nhk", q.to(F64), picked)


def dense_weights(indices: torch.Tensor, weights: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, rows) float64 matrix with W[n, indices[n, b]] += weights[n, b] (differentiable)."""
    n, picks = indices.shape
    token = torch.arange(n).repeat_interleave(picks)
    dense = torch.zeros(n, rows, dtype=F64)
    return dense.index_put((token, indices.reshape(-1)), weights.to(F64).reshape(-1), True)


def dense_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
    return dense_weights(indices, weights, values.shape[0]) @ values.to(F64)


# ----------------------------------------------------------------------------- opcheck


def _pk_samples():
    q = _randn(3, 2, 8, seed=1, dtype=torch.float32, requires_grad=True)
    k = _randn(2, 2, 5, 4, seed=2, dtype=torch.float32, requires_grad=True)
    yield q, k, 3
    yield q, k, 1
    yield q, k, 5  # knn == n_keys
    # Non-contiguous q and keys (dense but permuted strides).
    q_nc = _randn(2, 3, 8, seed=3, dtype=torch.float32).transpose(0, 1).requires_grad_()
    k_nc = _randn(2, 2, 5, 4, seed=4, dtype=torch.float32).transpose(0, 1)
    k_nc = k_nc.contiguous().transpose(0, 1).requires_grad_()
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous()
    yield q_nc, k_nc, 2


def _bag_samples():
    v = _randn(9, 4, seed=5, dtype=torch.float32, requires_grad=True)
    idx = torch.randint(0, 9, (3, 5), generator=_gen(6))
    w = _randn(3, 5, seed=7, dtype=torch.float32, requires_grad=True)
    yield v, idx, w
    yield v, torch.full((4, 3), 2, dtype=torch.int64), _randn(4, 3, seed=8).float()
    v_nc = _randn(4, 9, seed=9, dtype=torch.float32).t().requires_grad_()
    w_nc = _randn(5, 3, seed=10, dtype=torch.float32).t().requires_grad_()
    yield v_nc, idx.clone(), w_nc
    yield v.detach().bfloat16().requires_grad_(), idx, w


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_pk_topk(sample):
    q, k, knn = list(_pk_samples())[sample]
    torch.library.opcheck(torch.ops.memcompile.pk_topk.default, (q, k, knn))
    _, indices = ops.pk_topk(q.detach(), k.detach(), knn)
    grad = _randn(*indices.shape, seed=11, dtype=torch.float32)
    torch.library.opcheck(
        torch.ops.memcompile.pk_topk_backward.default, (grad, q.detach(), k.detach(), indices)
    )


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_bag(sample):
    v, idx, w = list(_bag_samples())[sample]
    torch.library.opcheck(torch.ops.memcompile.bag.default, (v, idx, w))
    grad = _randn(idx.shape[0], v.shape[1], seed=12).to(v.dtype)
    torch.library.opcheck(
        torch.ops.memcompile.bag_backward.default, (grad, v.detach(), idx, w.detach())
    )


@pytest.mark.parametrize("sample", range(4))
def test_pk_lookup_is_topk_softmax_bag(sample):
    q, keys, knn = list(_pk_samples())[sample]
    q, keys = q.detach(), keys.detach()
    values = _randn(keys.shape[2] ** 2, 6, seed=15, dtype=torch.float32)
    torch.library.opcheck(torch.ops.memcompile.pk_lookup.default, (q, keys, values, knn))
    top = brute_topk(q, keys, knn)
    n = q.shape[0]
    probs = torch.softmax(top.values, dim=-1)
    expected = dense_bag(values, top.indices.reshape(n, -1), probs.reshape(n, -1))
    out = ops.pk_lookup(q, keys, values, knn)
    assert out.dtype == torch.float32 and out.shape == (n, 6)
    torch.testing.assert_close(out.to(F64), expected, rtol=1e-5, atol=1e-6)

    swilu = _randn(n, 6, seed=16, dtype=F64)  # the gate, in another dtype than the values
    torch.library.opcheck(torch.ops.memcompile.pk_lookup.default, (q, keys, values, knn, swilu))
    gated = ops.pk_lookup(q, keys, values, knn, swilu)
    assert gated.dtype == F64
    torch.testing.assert_close(gated, expected * swilu * torch.sigmoid(swilu), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtypes", [(F64, F64), (torch.float32, F64), (torch.bfloat16,) * 2])
def test_silu_gate_and_its_gradients_match_float64_autograd(dtypes):
    x_dtype, gate_dtype = dtypes
    x = _randn(5, 7, seed=21, dtype=x_dtype).requires_grad_()
    gate = (3 * _randn(5, 7, seed=22, dtype=gate_dtype)).requires_grad_()
    out = ops.silu_gate(x, gate)
    assert out.dtype == gate_dtype and out.is_contiguous()
    grad = _randn(5, 7, seed=23, dtype=gate_dtype)
    out.backward(grad)
    x64, gate64 = x.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    want = x64 * gate64 * torch.sigmoid(gate64)
    want.backward(grad.double())
    tol = {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}  # of each result's dtype
    for got, exact in ((out, want), (x.grad, x64.grad), (gate.grad, gate64.grad)):
        torch.testing.assert_close(got.double(), exact.detach(), rtol=tol[got.dtype],
                                   atol=tol[got.dtype])  # fmt: skip
    torch.library.opcheck(torch.ops.memcompile.silu_gate.default, (x.detach(), gate.detach()))
    torch.library.opcheck(
        torch.ops.memcompile.silu_gate_backward.default, (grad, x.detach(), gate.detach())
    )


def test_silu_gate_takes_non_contiguous_inputs_and_stride_zero_gradients():
    x = _randn(7, 5, seed=24, dtype=F64).t().requires_grad_()  # (5, 7), not contiguous
    gate = _randn(5, 7, seed=25, dtype=F64).requires_grad_()
    torch.library.opcheck(torch.ops.memcompile.silu_gate.default, (x.detach(), gate.detach()))
    ops.silu_gate(x, gate).sum().backward()  # the gradient of a sum: stride 0
    s = torch.sigmoid(gate.detach())
    torch.testing.assert_close(x.grad, gate.detach() * s)
    torch.testing.assert_close(gate.grad, x.detach() * s * (1 + gate.detach() * (1 - s)))


def test_public_names_are_the_registered_ops():
    assert kernels.pk_topk is ops.pk_topk
    assert kernels.bag is ops.bag
    assert kernels.pk_lookup is ops.pk_lookup
    q = _randn(2, 1, 4, seed=13)
    k = _randn(1, 2, 3, 2, seed=14)
    a = torch.ops.memcompile.pk_topk(q, k, 2)
    b = kernels.pk_topk(q, k, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- pk_topk


@st.composite
def pk_cases(draw):
    n_keys = draw(st.integers(1, 8))
    return dict(
        n=draw(st.integers(0, 5)),
        heads=draw(st.integers(1, 3)),
        n_keys=n_keys,
        knn=draw(st.integers(1, n_keys)),
        half=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@SETTINGS
@given(pk_cases())
def test_pk_topk_is_exact_topk_over_all_keys(case):
    n, heads, n_keys, knn, half = (case[k] for k in ("n", "heads", "n_keys", "knn", "half"))
    q = _randn(n, heads, 2 * half, seed=case["seed"])
    keys = _randn(heads, 2, n_keys, half, seed=case["seed"] + 1)
    scores, indices = kernels.pk_topk(q, keys, knn)
    ref_scores, ref_indices = brute_topk(q, keys, knn)

    assert scores.shape == indices.shape == (n, heads, knn)
    assert scores.dtype == F64 and indices.dtype == torch.int64
    # Same index sets, and (no ties with continuous values) the same order.
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)
    assert bool((scores[..., :-1] >= scores[..., 1:]).all())
    # Every returned score is the score of the full key its index names.
    torch.testing.assert_close(scores, selected_scores(q, keys, indices), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pk_topk_low_precision_scores_in_float32(dtype):
    q = _randn(6, 2, 8, seed=20, dtype=dtype)
    keys = _randn(2, 2, 6, 4, seed=21, dtype=dtype)
    scores, indices = kernels.pk_topk(q, keys, 4)
    assert scores.dtype == torch.float32
    assert indices.dtype == torch.int64
    assert bool(((indices >= 0) & (indices < 36)).all())
    # Exact float64 scores of the chosen keys, from the same (rounded) inputs.
    ref = selected_scores(q.double(), keys.double(), indices)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-5)
    # The chosen keys are the true top-4 (checked on the float64 scores of the inputs).
    _, ref_indices = brute_topk(q.double(), keys.double(), 4)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)


def test_pk_topk_backward_matches_brute_force_autograd():
    q = _randn(5, 3, 6, seed=30, requires_grad=True)
    keys = _randn(3, 2, 4, 3, seed=31, requires_grad=True)
    upstream = _randn(5, 3, 3, seed=32)
    scores, indices = kernels.pk_topk(q, keys, 3)
    gq, gk = torch.autograd.grad((scores * upstream).sum(), (q, keys))

    ref = selected_scores(q, keys, indices)
    rq, rk = torch.autograd.grad((ref * upstream).sum(), (q, keys))
    torch.testing.assert_close(gq, rq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gk, rk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pk_topk_backward_in_half_precision_is_close_to_float64(dtype):
    # Half-precision inputs take half-precision matmuls (float32 accumulation): the
    # gradients stay within that dtype's rounding of the float64 ones.
    q = _randn(40, 2, 16, seed=33, dtype=dtype, requires_grad=True)
    keys = _randn(2, 2, 9, 8, seed=34, dtype=dtype, requires_grad=True)
    upstream = _randn(40, 2, 4, seed=35, dtype=torch.float32)
    scores, indices = kernels.pk_topk(q, keys, 4)
    gq, gk = torch.autograd.grad((scores * upstream).sum(), (q, keys))
    assert gq.dtype == gk.dtype == dtype
    q64, k64 = q.detach().double().requires_grad_(), keys.detach().double().requires_grad_()
    ref = selected_scores(q64, k64, indices)
    rq, rk = torch.autograd.grad((ref * upstream.double()).sum(), (q64, k64))
    for got, want in ((gq, rq), (gk, rk)):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 1e-2, error


@pytest.mark.parametrize("knn", [1, 2, 4])
def test_pk_topk_gradcheck(knn):
    q = _randn(3, 2, 6, seed=40 + knn, requires_grad=True)
    keys = _randn(2, 2, 4, 3, seed=50 + knn, requires_grad=True)

    def scores_only(q, keys):
        return kernels.pk_topk(q, keys, knn)[0]

    assert torch.autograd.gradcheck(scores_only, (q, keys), eps=1e-6, atol=1e-6)


def test_pk_topk_non_contiguous_upstream_grads():
    q = _randn(4, 2, 6, seed=60, requires_grad=True)
    keys = _randn(2, 2, 5, 3, seed=61, requires_grad=True)
    scores, indices = kernels.pk_topk(q, keys, 3)
    ref = selected_scores(q, keys, indices)

    # .sum() gives a stride-0 gradient.
    got = torch.autograd.grad(scores.sum(), (q, keys))
    want = torch.autograd.grad(ref.sum(), (q, keys), retain_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # An expand()ed gradient and a transposed (permuted) one.
    row = _randn(1, 1, 3, seed=62)
    for upstream in (row.expand(4, 2, 3), _randn(2, 4, 3, seed=63).transpose(0, 1)):
        assert not upstream.is_contiguous()
        scores, _ = kernels.pk_topk(q, keys, 3)
        got = torch.autograd.grad(scores, (q, keys), upstream)
        want = torch.autograd.grad((ref * upstream).sum(), (q, keys), retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pk_topk_empty_batch():
    q = torch.zeros(0, 2, 4, dtype=F64, requires_grad=True)
    keys = _randn(2, 2, 3, 2, seed=70, requires_grad=True)
    scores, indices = kernels.pk_topk(q, keys, 2)
    assert scores.shape == indices.shape == (0, 2, 2)
    scores.sum().backward()
    assert q.grad.shape == q.shape
    assert torch.equal(keys.grad, torch.zeros_like(keys))


# ----------------------------------------------------------------------------- bag


def _check_bag(values, indices, weights, upstream, rtol=1e-12, atol=1e-12):
    values = values.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    out = kernels.bag(values, indices, weights)
    assert out.shape == (indices.shape[0], values.shape[1])
    assert out.dtype == values.dtype
    gv, gw = torch.autograd.grad(out, (values, weights), upstream)

    rv = values.detach().to(F64).requires_grad_()
    rw = weights.detach().to(F64).requires_grad_()
    ref = dense_bag(rv, indices, rw)
    rgv, rgw = torch.autograd.grad(ref, (rv, rw), upstream.to(F64))
    torch.testing.assert_close(out.to(F64), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(gv.to(F64), rgv, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw.to(F64), rgw, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "indices",
    [
        [[3, 3, 3, 1]],  # one row repeated within a bag
        [[2, 2], [2, 2], [2, 2]],  # one row picked by every token
        [[0], [5], [0]],  # bags of one
        [[5, 4, 3, 2, 1, 0]],  # every row once
        [[1, 0, 1], [0, 1, 0]],  # repeats within and across bags
    ],
)
def test_bag_repeated_and_small_bags(indices):
    indices = torch.tensor(indices)
    n, picks = indices.shape
    values = _randn(6, 3, seed=80)
    weights = _randn(n, picks, seed=81)
    _check_bag(values, indices, weights, _randn(n, 3, seed=82))


def test_bag_empty_batch():
    values = _randn(4, 3, seed=90, requires_grad=True)
    weights = torch.zeros(0, 5, dtype=F64, requires_grad=True)
    out = kernels.bag(values, torch.zeros(0, 5, dtype=torch.int64), weights)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values))
    assert weights.grad.shape == (0, 5)


def test_bag_single_row_table():
    values = _randn(1, 4, seed=91)
    indices = torch.zeros(3, 2, dtype=torch.int64)
    _check_bag(values, indices, _randn(3, 2, seed=92), _randn(3, 4, seed=93))


@st.composite
def bag_cases(draw):
    rows = draw(st.integers(1, 12))
    return dict(
        n=draw(st.integers(0, 6)),
        picks=draw(st.integers(1, 9)),
        rows=rows,
        used=draw(st.integers(1, rows)),  # small `used` forces many repeated rows
        v_dim=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@SETTINGS
@given(bag_cases())
def test_bag_matches_dense_reference(case):
    n, picks, rows, v_dim, seed = (case[k] for k in ("n", "picks", "rows", "v_dim", "seed"))
    indices = torch.randint(0, case["used"], (n, picks), generator=_gen(seed))
    _check_bag(
        _randn(rows, v_dim, seed=seed + 1),
        indices,
        _randn(n, picks, seed=seed + 2),
        _randn(n, v_dim, seed=seed + 3),
    )


def test_bag_chunked_path(monkeypatch):
    """Tokens split over many chunks give the same result as one pass."""
    monkeypatch.setattr(reference, "_BAG_CHUNK_ELEMENTS", 7)
    indices = torch.randint(0, 5, (11, 3), generator=_gen(100))
    _check_bag(_randn(5, 4, seed=101), indices, _randn(11, 3, seed=102), _randn(11, 4, seed=103))


# Unit roundoff of the output dtype: rounding the exact result once may cost this much.
_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bag_low_precision_tables_accumulate_in_float32(dtype):
    n, picks, rows, v_dim = 8, 64, 50, 16
    values = _randn(rows, v_dim, seed=110).to(dtype).requires_grad_()
    indices = torch.randint(0, rows, (n, picks), generator=_gen(111))
    weights = torch.rand(n, picks, generator=_gen(112))
    weights = (weights / weights.sum(-1, keepdim=True)).requires_grad_()
    upstream = _randn(n, v_dim, seed=113).to(dtype)

    out = kernels.bag(values, indices, weights)
    assert out.dtype == dtype
    gv, gw = torch.autograd.grad(out, (values, weights), upstream)
    assert gv.dtype == dtype and gw.dtype == torch.float32

    # Float64 reference from the table's own (already rounded) entries: the only error
    # allowed beyond float32 accumulation is one rounding of the result to `dtype`.
    v64, w64, g64 = values.detach().double(), weights.detach().double(), upstream.double()
    dense = dense_weights(indices, w64, rows)
    u = _ROUNDOFF[dtype]

    def check(got, exact, magnitude):
        bound = u * exact.abs() + 1e-6 * magnitude + 1e-30
        err = (got.double() - exact).abs()
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"

    check(out, dense @ v64, dense.abs() @ v64.abs())
    check(gv, dense.t() @ g64, dense.abs().t() @ g64.abs())
    exact_gw = torch.einsum("nbd,nd->nb", v64[indices], g64)
    gw_mag = torch.einsum("nbd,nd->nb", v64[indices].abs(), g64.abs())
    bound = 1e-6 * gw_mag + 1e-30  # float32 result: float32 accumulation only
    assert bool(((gw.double() - exact_gw).abs() <= bound).all())


@pytest.mark.parametrize("picks", [1, 3])
def test_bag_gradcheck(picks):
    values = _randn(5, 3, seed=120 + picks, requires_grad=True)
    indices = torch.tensor([[0, 2, 2][:picks], [4, 4, 1][:picks], [2, 0, 3][:picks]])
    weights = _randn(3, picks, seed=130 + picks, requires_grad=True)

    def fn(values, weights):
        return kernels.bag(values, indices, weights)

    assert torch.autograd.gradcheck(fn, (values, weights), eps=1e-6, atol=1e-6)


def test_bag_non_contiguous_upstream_grads():
    values = _randn(6, 4, seed=140)
    indices = torch.tensor([[1, 1, 5], [0, 1, 2], [5, 5, 5]])
    weights = _randn(3, 3, seed=141)

    # out.sum().backward(): a stride-0 gradient.
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    kernels.bag(v, indices, w).sum().backward()
    rv = values.clone().requires_grad_()
    rw = weights.clone().requires_grad_()
    dense_bag(rv, indices, rw).sum().backward()
    torch.testing.assert_close(v.grad, rv.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, rw.grad, rtol=1e-12, atol=1e-12)

    # expand()ed and transposed gradients.
    for upstream in (_randn(1, 4, seed=142).expand(3, 4), _randn(4, 3, seed=143).t()):
        assert not upstream.is_contiguous()
        _check_bag(values, indices, weights, upstream)
