"""The Triton kernels of the fused value update, through the CUDA ops' entry points
(kernels/cuda.py), against its PyTorch path: on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, fp32 and fp16, tiny shapes), on a GPU natively (there also bf16, with
and without stochastic rounding).

Run by test_triton_kernels.py in a process of its own (see triton_cases.py for why)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from memcompile.kernels import cuda, fused_update, triton_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
pytestmark = pytest.mark.usefixtures("one_thread", "kernels_built")

CASES = [
    # n, picks, rows, v_dim, hot row (picked by every token, several times per bag)
    (6, 8, 40, 48, None),
    (5, 12, 30, 100, 7),  # v_dim not a power of two
    (3, 16, 12, 20, 0),  # many pairs per row: several pair blocks per program
    (4, 1, 50, 16, None),  # bags of one, most rows untouched
    (0, 4, 10, 16, None),  # empty batch
]


def _problem(n, picks, rows, v_dim, hot, dtype, optimizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, v_dim, generator=g).to(DEVICE, dtype)
    indices = torch.randint(0, rows, (n, picks), generator=g)
    if hot is not None:
        indices[:, ::2] = hot
    weights = torch.rand(n, picks, generator=g)
    grad_out = torch.randn(n, v_dim, generator=g).to(DEVICE, dtype)
    shape_a, shape_b = fused_update.state_shapes(optimizer, (rows, v_dim))
    state_a = torch.rand(shape_a, generator=g)  # a state from earlier steps
    state_b = torch.rand(shape_b, generator=g)
    return [values, state_a.to(DEVICE), state_b.to(DEVICE), indices.to(DEVICE),
            weights.to(DEVICE), grad_out]  # fmt: skip


def _close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _update_matches_reference(args, scale, hyper, dtype=torch.float32):
    """Step `args` (values, states, ...) with the CUDA op and a copy with the PyTorch path:
    the same values, states and weight gradient. Returns the untouched copy's tensors."""
    ref = [t.clone() for t in args]
    grad_w = cuda.fused_row_update_cuda(*args, None, scale, *hyper)
    want_w = fused_update.fused_row_update_reference(*ref, None, scale, *hyper)
    for got, want in zip(args[:3], ref[:3]):  # values and state, updated in place
        _close(got, want, dtype)
    _close(grad_w, want_w, dtype)
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize(("n", "picks", "rows", "v_dim", "hot"), CASES)
def test_fused_update_matches_the_torch_path(n, picks, rows, v_dim, hot, optimizer, dtype):
    args = _problem(n, picks, rows, v_dim, hot, dtype, optimizer)
    hyper = (optimizer, 0.05, 1e-6, 0.9, 0.99, 0.1, v_dim, 3, 11, False, True)
    ref = _update_matches_reference(args, None, hyper, dtype)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[args[3].reshape(-1).cpu()] = False
    assert torch.equal(args[0][untouched.to(DEVICE)], ref[0][untouched.to(DEVICE)])


@pytest.mark.parametrize("split, l2_hints, token_order", [(0, False, False), (4, True, True)])
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_fused_update_over_several_column_blocks(
    monkeypatch, optimizer, split, l2_hints, token_order
):
    # Blocks of 16 columns, rows of up to 2 pairs in the short-row kernel: v_dim 40 is
    # three column blocks, so Adagrad's row norms must come from the whole row before any
    # block is stepped, and most rows go through the long-row loop; with a split, rows of
    # more than 4 pairs (the hot one) are summed in chunks, then combined and stepped; L2
    # eviction priorities and the L2 window (on a GPU) must not change a result, nor
    # walking the rows by first token (Adagrad's row norms then stored by row).
    shape = (2, 16, 4, 7, 2, split, l2_hints, l2_hints, token_order)
    monkeypatch.setattr(triton_rows, "pass_blocks", lambda *_, **__: shape)
    args = _problem(9, 10, 50, 40, 21, torch.float32, optimizer, seed=4)
    hyper = (optimizer, 0.05, 1e-6, 0.9, 0.99, 0.1, 40, 2, 11, False, True)
    _update_matches_reference(args, None, hyper)


@pytest.mark.parametrize(
    "column_blocks, split, token_order", [(1, 0, False), (1, 4, True), (1, 0, True), (3, 0, True)]
)
def test_adagrad_with_a_clip_scale_and_its_own_row_norms(
    monkeypatch, column_blocks, split, token_order
):
    # The scale multiplies the gradient before its squared norm: in the update pass when one
    # column block holds the row (with a split: in the combine of a split row's chunks),
    # in the norms pass when three blocks of 16 columns do. Walking the rows by first token
    # must not change a result.
    block_p, block_v = (4, 64) if column_blocks == 1 else (2, 16)
    shape = (block_p, block_v, 4, 7, 2, split, False, False, token_order)
    monkeypatch.setattr(triton_rows, "pass_blocks", lambda *_, **__: shape)
    args = _problem(6, 5, 20, 40, 4, torch.float32, "rowwise_adagrad", seed=6)
    scale = torch.tensor([0.4], device=DEVICE)
    hyper = ("rowwise_adagrad", 0.05, 1e-8, 0.9, 0.999, 0.01, 48, 1, 5, False, True)
    _update_matches_reference(args, scale, hyper)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_given_row_norms_and_clip_scale_and_no_weight_gradient(optimizer):
    """The two-pass form (column shards, clipping): row norms from outside, gradient scaled."""
    args = _problem(7, 6, 24, 40, 3, torch.float32, optimizer, seed=1)
    ref = [t.clone() for t in args]
    row_sq = cuda.row_grad_sq_cuda(args[0], args[3], args[4], args[5])
    _close(row_sq, fused_update.row_grad_sq_reference(args[0], args[3], args[4], args[5]),
           torch.float32)  # fmt: skip
    row_sq = row_sq * 2.5  # as if other column shards added theirs
    scale = torch.tensor([0.3], device=DEVICE)
    hyper = (optimizer, 0.05, 1e-8, 0.9, 0.999, 0.0, 100, 1, 5, False, False)
    out = cuda.fused_row_update_cuda(*args, row_sq, scale, *hyper)
    fused_update.fused_row_update_reference(*ref, row_sq.clone(), scale, *hyper)
    assert out.numel() == 0
    for got, want in zip(args[:3], ref[:3]):
        _close(got, want, torch.float32)


def test_adagrad_state_of_untouched_rows_stays_when_norms_come_from_outside():
    # Row norms given for every row (as a caller may), and a NaN clip scale (from a NaN
    # gradient norm): only the rows this step touches may change state.
    args = _problem(4, 3, 30, 16, None, torch.float32, "rowwise_adagrad", seed=5)
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[args[3].reshape(-1).cpu()] = False
    before = args[1].clone()
    row_sq = torch.ones(30, device=DEVICE)
    hyper = ("rowwise_adagrad", 0.05, 1e-8, 0.9, 0.999, 0.0, 16, 1, 5, False, False)
    for scale in (torch.tensor([0.5], device=DEVICE), torch.tensor([float("nan")], device=DEVICE)):
        cuda.fused_row_update_cuda(*args, row_sq, scale, *hyper)
        keep = untouched.to(DEVICE)
        assert torch.equal(args[1][keep], before[keep])
    assert not torch.isnan(args[1][untouched.to(DEVICE)]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "picks", "rows", "v_dim"), [(5, 40, 30, 300), (3, 7, 9, 20)])
def test_weight_gradient_alone(n, picks, rows, v_dim, dtype):
    values, _, _, indices, _, grad_out = _problem(n, picks, rows, v_dim, 2, dtype, "adam")
    got = cuda.bag_weight_grad_cuda(grad_out, values, indices)
    assert got.dtype == torch.float32 and got.shape == (n, picks)
    _close(got, fused_update.weight_grad_reference(grad_out, values, indices), dtype)


def test_fused_update_is_deterministic():
    first = _problem(9, 16, 12, 64, 3, torch.float32, "adam", seed=2)
    second = [t.clone() for t in first]
    hyper = ("adam", 0.01, 1e-8, 0.9, 0.999, 0.0, 64, 2, 0, False, True)
    w1 = cuda.fused_row_update_cuda(*first, None, None, *hyper)
    w2 = cuda.fused_row_update_cuda(*second, None, None, *hyper)
    assert torch.equal(w1, w2) and all(torch.equal(a, b) for a, b in zip(first, second))


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    args = _problem(64, 32, 16, 256, None, torch.bfloat16, "rowwise_adagrad", seed=3)
    exact = [t.clone() for t in args]
    exact[0] = exact[0].float()
    hyper = ("rowwise_adagrad", 1e-3, 1e-8, 0.9, 0.999, 0.0, 256, 1, 7)
    cuda.fused_row_update_cuda(*args, None, None, *hyper, True, False)
    fused_update.fused_row_update_reference(*exact, None, None, *hyper, False, False)
    x = exact[0]
    toward_zero = (x.view(torch.int32) & -65536).view(torch.float32)
    away = (toward_zero.view(torch.int32) + 65536).view(torch.float32)
    got = args[0].float()
    assert ((got == toward_zero) | (got == away)).all()
    nearest = x.to(torch.bfloat16).float()
    assert (got != nearest).any()  # not round-to-nearest
    assert (got - x).mean().abs() < 0.1 * (got - x).abs().mean()  # unbiased


def test_adagrad_over_rows_of_up_to_2048_columns_in_one_block():
    # 1100 columns: one block of 2048 (8 warps) holds the whole row, so the update pass
    # advances each row's state itself, with no norms pass; the hot row (more than 8 pairs)
    # goes through the long-row loop.
    args = _problem(5, 4, 6, 1100, 3, torch.float32, "rowwise_adagrad", seed=8)
    assert triton_rows.pass_blocks(1100, 20 / 6, whole_rows=True)[1] == 2048
    hyper = ("rowwise_adagrad", 0.05, 1e-8, 0.9, 0.999, 0.01, 1100, 1, 5, False, True)
    _update_matches_reference(args, None, hyper)
