"""The Triton kernels against the PyTorch reference: on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, fp32 and fp16, tiny shapes), on a GPU natively when there is one.

Run by test_triton_kernels.py in a process of its own: Triton fixes the interpreter mode
when it is first imported, and TRITON_INTERPRET must not leak into the other tests."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from memcompile.kernels import cuda, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("one_thread", "kernels_built")


def _rand(*shape, dtype=torch.float32, generator):
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def _bag_inputs(n, picks, rows, v_dim, dtype, seed=0, hot_row=None):
    g = torch.Generator().manual_seed(seed)
    values = _rand(rows, v_dim, dtype=dtype, generator=g)
    indices = torch.randint(0, rows, (n, picks), generator=g)
    if hot_row is not None:
        indices[:, ::2] = hot_row  # one row picked by every token, several times per bag
    weights = torch.rand(n, picks, generator=g)
    return values, indices.to(DEVICE), weights.to(DEVICE)


def _close(got, want, dtype, terms: int = 1):
    """Within the dtype's tolerance; sums of more than 128 `terms` get sqrt(terms / 128)
    times more, as rounding errors grow."""
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype] * max(1.0, (terms / 128) ** 0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


BAG_CASES = [
    # n, picks, rows, v_dim, hot row
    (6, 8, 40, 96, None),
    (5, 12, 30, 320, 7),
    (4, 1, 10, 96, None),  # bags of one
    (3, 48, 20, 96, 0),  # many picks per bag, one hot row
    (3, 8, 16, 1500, 2),  # v_dim over one backward block (1024): weight grads accumulate
    (0, 8, 16, 96, None),  # empty batch
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "picks", "rows", "v_dim", "hot"), BAG_CASES)
def test_bag_forward_and_backward_match_the_reference(n, picks, rows, v_dim, hot, dtype):
    values, indices, weights = _bag_inputs(n, picks, rows, v_dim, dtype, hot_row=hot)
    out = cuda.bag_cuda(values, indices, weights)
    assert out.dtype == dtype and out.shape == (n, v_dim)
    _close(out, reference.bag(values, indices, weights), dtype)

    grad = _rand(n, v_dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grad_values, grad_weights = cuda.bag_backward_cuda(grad, values, indices, weights)
    ref_values, ref_weights = reference.bag_backward(
        grad.double(), values.double(), indices, weights.double()
    )
    assert grad_values.shape == values.shape and grad_weights.shape == weights.shape
    assert torch.isfinite(grad_values.float()).all()
    _close(grad_values, ref_values, dtype)
    _close(grad_weights, ref_weights, dtype, terms=v_dim)  # a dot over the row


def test_bag_backward_is_deterministic_and_handles_stride_zero_gradients():
    values, indices, weights = _bag_inputs(9, 16, 12, 96, torch.float32, hot_row=3)
    grad = torch.ones(1, 1, device=DEVICE).expand(9, 96)  # as from out.sum().backward()
    first = cuda.bag_backward_cuda(grad, values, indices, weights)
    second = cuda.bag_backward_cuda(grad, values, indices, weights)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ref = reference.bag_backward(grad.contiguous(), values, indices, weights)
    _close(first[0], ref[0], torch.float32)
    strided = values.t().contiguous().t()  # same values, column-major
    _close(cuda.bag_cuda(strided, indices, weights), reference.bag(values, indices, weights),
           torch.float32)  # fmt: skip


def test_row_sparse_value_gradient_holds_exactly_the_touched_rows():
    from memcompile.kernels import triton_bag

    values, indices, weights = _bag_inputs(5, 6, 50, 96, torch.float32, hot_row=4)
    grad = _rand(5, 96, generator=torch.Generator().manual_seed(2))
    rows = torch.unique(indices)
    grad_rows, grad_weights = triton_bag.bag_backward(grad, values, indices, weights, rows)
    dense, ref_weights = reference.bag_backward(grad, values, indices, weights)
    got = cuda.bag_backward_rows_cuda(grad, values, indices, weights, rows)  # the op's kernel
    for a, b in zip(got, reference.bag_backward_rows(grad, values, indices, weights, rows)):
        _close(a, b, torch.float32)
    _close(grad_rows, dense[rows], torch.float32)
    _close(grad_weights, ref_weights, torch.float32)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert torch.count_nonzero(dense[untouched.to(DEVICE)]) == 0


@pytest.mark.parametrize("split, l2_hints", [(0, False), (4, True)])
@pytest.mark.parametrize("sparse, token_order", [(False, False), (False, True), (True, True)])
def test_backward_over_column_blocks_with_rows_past_the_short_row_kernel(
    monkeypatch, sparse, token_order, split, l2_hints
):
    from memcompile.kernels import triton_bag, triton_rows

    # Rows of up to 2 pairs in the short-row kernel, so most rows go to the long-row loop,
    # and with a split the rows of more than 4 pairs (the hot one) are summed in chunks of
    # 4, then combined; blocks of 16 columns, so v_dim 40 is three column blocks (the
    # weight gradient summed over them). 60 rows, 7 a program: 9 programs, each striding
    # over the list. L2 eviction priorities and the L2 window (on a GPU) must not change a
    # result; nor walking the rows by first token (ignored with a row list).
    shape = (2, 16, 4, 7, 2, split, l2_hints, l2_hints, token_order)
    monkeypatch.setattr(triton_rows, "pass_blocks", lambda *_, **__: shape)
    values, indices, weights = _bag_inputs(7, 12, 60, 40, torch.float32, hot_row=17)
    grad = _rand(7, 40, generator=torch.Generator().manual_seed(3))
    dense, ref_weights = reference.bag_backward(
        grad.double(), values.double(), indices, weights.double()
    )
    # Rows in a shuffled order, as a strided (not contiguous) view (sparse), or all rows.
    rows = None
    if sparse:
        shuffled = torch.unique(indices)[torch.randperm(torch.unique(indices).numel())]
        rows = torch.stack([shuffled, shuffled], 1)[:, 0]
    grad_values, grad_weights = triton_bag.bag_backward(grad, values, indices, weights, rows)
    _close(grad_values, dense if rows is None else dense[rows], torch.float32)
    _close(grad_weights, ref_weights, torch.float32)


def _all_pair_scores(q, keys):
    """Scores of every full key [k1_i ; k2_j]: (N, heads, n_keys**2), brute force."""
    half = keys.shape[-1]
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], keys[:, 1])
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2)


TOPK_CASES = [
    # n, heads, n_keys, k_dim, knn
    (5, 2, 16, 32, 1),
    (7, 2, 16, 32, 8),
    (20, 1, 40, 16, 3),  # n_keys and knn not powers of two
    (3, 3, 8, 20, 8),  # knn == n_keys, half width 10
    (18, 1, 300, 32, 4),  # several key blocks per half
    (0, 2, 16, 32, 4),  # empty batch
    (4, 2, 5, 16, 5),  # knn == n_keys < K = 8: each half's top-K padded past its sub-keys
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "heads", "n_keys", "k_dim", "knn"), TOPK_CASES)
def test_pk_topk_matches_the_reference(n, heads, n_keys, k_dim, knn, dtype):
    g = torch.Generator().manual_seed(n_keys + knn)
    q = _rand(n, heads, k_dim, dtype=dtype, generator=g)
    keys = _rand(heads, 2, n_keys, k_dim // 2, dtype=dtype, generator=g)
    scores, indices = cuda.pk_topk_cuda(q, keys, knn)
    ref_scores, ref_indices = reference.pk_topk(q, keys, knn)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert scores.shape == indices.shape == (n, heads, knn)
    if dtype == torch.float32:
        assert torch.equal(indices, ref_indices)
    else:  # half-precision scores may order near-ties differently: compare true scores
        full = _all_pair_scores(q.double().cpu(), keys.double().cpu())
        best = full.topk(knn, dim=-1).values
        torch.testing.assert_close(full.gather(-1, indices.cpu()), best, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(scores, ref_scores, rtol=2e-3, atol=2e-3)
    assert (scores[..., :-1] >= scores[..., 1:]).all()


@pytest.mark.parametrize("dominant_half", [0, 1])
@pytest.mark.parametrize("knn", [8, 7])
def test_pk_topk_when_one_sub_key_dominates(dominant_half, knn):
    # Sub-key 0 of one half outscores the rest by far, so the top-knn full keys pair it
    # with the other half's top-knn: the candidate pairs deepest in one list, (K - 1, 0)
    # or (0, K - 1), which the merge must rank.
    g = torch.Generator().manual_seed(knn)
    q = _rand(3, 2, 32, generator=g).abs()
    keys = _rand(2, 2, 40, 16, generator=g)
    keys[:, dominant_half, 0] = 5.0
    scores, indices = cuda.pk_topk_cuda(q, keys, knn)
    ref_scores, ref_indices = reference.pk_topk(q, keys, knn)
    picked = indices // 40 if dominant_half == 0 else indices % 40  # id = i1 * n_keys + i2
    assert torch.equal(picked, torch.zeros_like(picked))  # the case is what it claims
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["split-keys", "one-slice", "wide-blocks"])
@pytest.mark.parametrize(("n", "knn"), [(1, 4), (19, 8)])
def test_pk_topk_paths_for_small_and_large_batches(monkeypatch, path, n, knn):
    from memcompile.kernels import triton_topk

    # Force the path: small batches split each sub-key scan over slices, large ones do not,
    # and the largest scan 64 tokens a program.
    monkeypatch.setattr(triton_topk, "_SPLIT_BELOW_PROGRAMS", 10**9 if path == "split-keys" else 0)
    monkeypatch.setattr(triton_topk, "_WIDE_SCAN_TOKENS", 1 if path == "wide-blocks" else 10**9)
    g = torch.Generator().manual_seed(n)
    q = _rand(n, 2, 32, generator=g)
    keys = _rand(2, 2, 300, 16, generator=g)  # three key blocks per half, a ragged last one
    scores, indices = triton_topk.pk_topk(q, keys, knn)
    ref_scores, ref_indices = reference.pk_topk(q, keys, knn)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


TOPK_BACKWARD_CASES = [
    # n, heads, n_keys, k_dim, knn, dominant: picks sharing sub-keys (every pick shares
    # sub-key 0 of the dominant half), knn not a power of two, knn 1, an empty batch
    (6, 2, 16, 32, 8, None),
    (5, 2, 40, 32, 7, 0),
    (4, 1, 12, 20, 5, 1),
    (3, 2, 16, 32, 1, None),
    (0, 2, 16, 32, 4, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "heads", "n_keys", "k_dim", "knn", "dominant"), TOPK_BACKWARD_CASES)
def test_pk_topk_backward_matches_float64(n, heads, n_keys, k_dim, knn, dominant, dtype):
    g = torch.Generator().manual_seed(n_keys + knn)
    q = _rand(n, heads, k_dim, generator=g).abs().to(dtype)
    keys = _rand(heads, 2, n_keys, k_dim // 2, generator=g)
    if dominant is not None:
        keys[:, dominant, 0] = 5.0
    keys = keys.to(dtype)
    _, indices = reference.pk_topk(q, keys, knn)
    sub = indices // n_keys if dominant == 0 else indices % n_keys
    assert dominant is None or (sub == 0).all()  # the case is what it claims
    grad = _rand(n, heads, knn, generator=g)
    grad_q, grad_keys = cuda.pk_topk_backward_cuda(grad, q, keys, indices)
    assert grad_q.dtype == q.dtype and grad_keys.dtype == keys.dtype
    # Sums with cancellation: each element's error against float64, bounded by the
    # dtype's rounding times the sum of its terms' sizes.
    f64 = [t.double() for t in (grad, q, keys)]
    want = reference.pk_topk_backward(*f64, indices)
    sizes = reference.pk_topk_backward(*[t.abs() for t in f64], indices)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
    for got, exact, size in zip((grad_q, grad_keys), want, sizes):
        assert ((got.double() - exact).abs() <= tol * size + 1e-7).all()
    # Deterministic: duplicates are summed in registers, not by atomics.
    again = cuda.pk_topk_backward_cuda(grad, q, keys, indices)
    assert all(torch.equal(a, b) for a, b in zip(again, (grad_q, grad_keys)))


def test_pk_topk_backward_takes_stride_zero_gradients():
    # The gradient of scores.sum(): one element broadcast over (N, heads, knn).
    g = torch.Generator().manual_seed(3)
    q, keys = _rand(5, 2, 32, generator=g), _rand(2, 2, 16, 16, generator=g)
    _, indices = reference.pk_topk(q, keys, 4)
    grad = torch.ones((), device=DEVICE).expand(5, 2, 4)
    got = cuda.pk_topk_backward_cuda(grad, q, keys, indices)
    want = reference.pk_topk_backward(grad.contiguous().double(), q.double(), keys.double(),
                                      indices)  # fmt: skip
    for a, b in zip(got, want):
        _close(a, b, torch.float32, terms=20)


@pytest.mark.parametrize(
    ("shape", "x_dtype", "gate_dtype"),
    [((5, 96), torch.float32, torch.float32), ((3, 1500), torch.float16, torch.float16),
     ((4, 320), torch.float16, torch.float32), ((0, 96), torch.float32, torch.float32)],
)  # fmt: skip
def test_silu_gate_forward_and_backward_match_float64(shape, x_dtype, gate_dtype):
    # 3 x 1500 spans several programs with a ragged last one; mixed dtypes: a half table's
    # bag gated in float32.
    g = torch.Generator().manual_seed(shape[1])
    x = _rand(*shape, dtype=x_dtype, generator=g)
    gate = (3 * _rand(*shape, generator=g)).to(gate_dtype)
    grad = _rand(*shape, dtype=gate_dtype, generator=g)
    out = cuda.silu_gate_cuda(x, gate)
    grad_x, grad_gate = cuda.silu_gate_backward_cuda(grad, x, gate)
    assert out.dtype == gate_dtype and grad_x.dtype == x_dtype and grad_gate.dtype == gate_dtype
    x64, g64, d64 = x.double(), gate.double(), grad.double()
    s = torch.sigmoid(g64)
    _close(out, x64 * g64 * s, gate_dtype)
    _close(grad_x, d64 * g64 * s, x_dtype)
    _close(grad_gate, d64 * x64 * s * (1 + g64 * (1 - s)), gate_dtype)


LOOKUP_CASES = [
    # n, heads, n_keys, knn, v_dim: decode (split scan, no tl.dot), a masked token block,
    # a full tl.dot block, an empty batch
    (1, 2, 40, 8, 96),
    (3, 3, 300, 1, 320),
    (19, 2, 16, 4, 96),
    (2, 2, 40, 3, 96),  # knn below K = 4: the padded slot must get no weight
    (0, 2, 16, 4, 96),
]


@pytest.mark.parametrize("gated", [False, True], ids=["bag", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "heads", "n_keys", "knn", "v_dim"), LOOKUP_CASES)
def test_pk_lookup_matches_topk_softmax_bag(n, heads, n_keys, knn, v_dim, dtype, gated):
    g = torch.Generator().manual_seed(n + n_keys)
    q = _rand(n, heads, 32, dtype=dtype, generator=g)
    keys = _rand(heads, 2, n_keys, 16, dtype=dtype, generator=g)
    values = _rand(n_keys**2, v_dim, dtype=dtype, generator=g)
    # The Memory+ gate's pre-activation, in another dtype than the values: the output's dtype
    swilu = _rand(n, v_dim, dtype=torch.float32, generator=g) if gated else None
    out = cuda.pk_lookup_cuda(q, keys, values, knn, swilu)
    assert out.dtype == (torch.float32 if gated else dtype) and out.shape == (n, v_dim)
    gate = 1.0 if swilu is None else torch.nn.functional.silu(swilu.double())
    if dtype == torch.float32:
        _close(out, reference.pk_lookup(q, keys, values.double(), knn) * gate, dtype)
    else:  # near-ties may pick other rows in fp16: bag the kernel's own picks in float64
        from memcompile.kernels import triton_topk

        probs, indices = triton_topk.pk_topk(q, keys, knn, softmax=True)
        all_pairs = _all_pair_scores(q.double().cpu(), keys.double().cpu())
        picked = all_pairs.gather(-1, indices.cpu())
        best = all_pairs.topk(knn, dim=-1).values  # the picks are true top-knn keys
        torch.testing.assert_close(picked, best, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(probs.cpu().double(), torch.softmax(picked, -1), rtol=1e-2,
                                   atol=1e-2)  # fmt: skip
        picks = heads * knn
        want = reference.bag(
            values.double(), indices.view(-1, picks), probs.double().view(-1, picks)
        )
        _close(out, want * gate, dtype)


LINEAR_CASES = [
    # n, d_in, outputs of each map, which maps have a bias
    (1, 300, (40, 24), (True, True)),  # d_in over several steps, ragged output blocks
    (3, 100, (17,), (False,)),  # one map
    (16, 64, (32, 48), (True, False)),  # all 16 rows of the tile, a bias on one map
    (2, 40, (8, 20, 33), (True, True, True)),  # three maps: two launches
    (0, 40, (8, 20), (True, True)),  # empty batch
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "d_in", "widths", "with_bias"), LINEAR_CASES)
def test_linears_match_float64_linear_maps(n, d_in, widths, with_bias, dtype):
    g = torch.Generator().manual_seed(n + d_in)
    x = _rand(n, d_in, dtype=dtype, generator=g)
    weights = [_rand(w, d_in, dtype=dtype, generator=g) * d_in**-0.5 for w in widths]
    biases = [_rand(w, dtype=dtype, generator=g) if b else None
              for w, b in zip(widths, with_bias)]  # fmt: skip
    outs = cuda.linears_cuda(x, weights, biases)
    assert [tuple(o.shape) for o in outs] == [(n, w) for w in widths]
    for out, w, b in zip(outs, weights, biases):
        assert out.dtype == dtype
        want = x.double() @ w.double().t() + (0 if b is None else b.double())
        _close(out, want, dtype, terms=d_in)


def test_layer_inference_path_matches_its_training_path():
    # Inference runs the fused ops (projections two a launch on a GPU, top-k with softmax,
    # the bag with its gating); with gradients the layer runs its modules, pk_topk and bag.
    from memcompile.runtime import MemoryConfig, MemoryLayer

    config = MemoryConfig(mem_size=24**2, heads=2, knn=4, k_dim=32, v_dim=40)
    layer = MemoryLayer(24, 20, config, seed=3, device=DEVICE)
    x = _rand(3, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        inference = layer(x)
    _close(inference, layer(x), torch.float32)

    # A hooked projection runs as its module, hook included (here: it scales the query).
    calls = []
    hook = layer.query.register_forward_hook(lambda m, args, out: calls.append(1) or out * 2)
    with torch.no_grad():
        hooked = layer(x)
    assert calls == [1]
    hook.remove()
    layer.query.weight.data.mul_(2)
    layer.query.bias.data.mul_(2)
    _close(hooked, layer(x), torch.float32)


OPCHECK_CASES = ["contiguous", "permuted", "fp16"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_ops_agree_with_their_fake_kernels_on_the_device(case):
    # On a GPU this checks the Triton implementations: Inductor plans buffers from the fake
    # kernels' shapes, strides and dtypes, so a real output that differs breaks compiled code.
    g = torch.Generator().manual_seed(OPCHECK_CASES.index(case))
    dtype = torch.float16 if case == "fp16" else torch.float32
    q = _rand(5, 2, 32, dtype=dtype, generator=g)
    keys = _rand(2, 2, 40, 16, dtype=dtype, generator=g)
    values = _rand(1600, 96, dtype=dtype, generator=g)
    if case == "permuted":  # dense, not contiguous
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
        values = values.t().contiguous().t()
    ops = torch.ops.memcompile
    torch.library.opcheck(ops.pk_topk.default, (q, keys, 4))
    torch.library.opcheck(ops.pk_lookup.default, (q, keys, values, 4))
    swilu = _rand(5, 96, dtype=dtype, generator=g)
    torch.library.opcheck(ops.pk_lookup.default, (q, keys, values, 4, swilu))
    weights = [_rand(96, 64, dtype=dtype, generator=g), _rand(7, 64, dtype=dtype, generator=g)]
    x = _rand(5, 64, dtype=dtype, generator=g)
    torch.library.opcheck(ops.linears.default, (x, weights, [weights[0][:, 0], None]))
    bag_out = _rand(5, 96, dtype=dtype, generator=g).t().contiguous().t()  # not contiguous
    torch.library.opcheck(ops.silu_gate.default, (bag_out, swilu))
    torch.library.opcheck(ops.silu_gate_backward.default, (swilu, bag_out, swilu))
    _, indices = ops.pk_topk(q, keys, 4)
    grad_scores = _rand(5, 2, 4, generator=g)
    torch.library.opcheck(ops.pk_topk_backward.default, (grad_scores, q, keys, indices))
    indices = indices.view(5, -1)
    weights = torch.rand(indices.shape, generator=g).to(DEVICE)
    torch.library.opcheck(ops.bag.default, (values, indices, weights))
    grad = _rand(5, 96, dtype=dtype, generator=g)
    torch.library.opcheck(ops.bag_backward.default, (grad, values, indices, weights))
