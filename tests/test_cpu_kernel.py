"""The C++ CPU kernel of memcompile::pk_lookup (kernels/cpu.py, kernels/decode_kernels.cc)
against a float64 brute force: every one of the n_keys**2 full keys scored, a top-k over
all of them, softmax per head, bag, gating. It also checks that the kernel, not the
PyTorch reference, ran (the library counts its calls) and where it steps aside."""

from __future__ import annotations

import pytest
import torch
from test_ops import brute_topk, dense_bag

from memcompile.kernels import cpu, native, ops
from memcompile.runtime import MemoryConfig, MemoryLayer

F64 = torch.float64


def brute_force_lookup(q, keys, values, knn, swilu=None):
    """(N, v_dim) float64: test_ops' top-k over all n_keys**2 full keys, a softmax per head,
    its dense bag and the gating."""
    top, rows = brute_topk(q, keys, knn)
    weights = torch.softmax(top, dim=-1)
    out = dense_bag(values, rows.flatten(1), weights.flatten(1))
    return out if swilu is None else out * torch.nn.functional.silu(swilu.to(F64))


def _inputs(tokens, heads, n_keys, half, v_dim, seed, values_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads, 2 * half, generator=g)
    keys = torch.randn(heads, 2, n_keys, half, generator=g)
    values = torch.randn(n_keys * n_keys, v_dim, generator=g).to(values_dtype)
    swilu = torch.randn(tokens, v_dim, generator=g)
    return q, keys, values, swilu


@pytest.fixture(autouse=True)
def _kernel_built():
    assert cpu._native(), "a C++17 compiler is on the test machine"


# Up to LOOKUP_MAX_TOKENS the kernel also scores the halves; beyond, torch's matmul does.
@pytest.mark.parametrize("tokens", [1, cpu.LOOKUP_MAX_TOKENS, cpu.LOOKUP_MAX_TOKENS + 1, 11])
@pytest.mark.parametrize("heads,knn", [(1, 1), (2, 4), (3, 8)])
@pytest.mark.parametrize("gated", [False, True])
def test_lookup_matches_brute_force(tokens, heads, knn, gated):
    q, keys, values, swilu = _inputs(tokens, heads, 10, 6, 96, seed=tokens * 10 + knn)
    gate = swilu if gated else None
    calls = native.call_count("lookup")
    with torch.inference_mode():
        out = ops.pk_lookup(q, keys, values, knn, gate)
    assert native.call_count("lookup") == calls + 1
    assert out.dtype == torch.float32 and out.shape == (tokens, 96)
    torch.testing.assert_close(out.to(F64), brute_force_lookup(q, keys, values, knn, gate),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("tokens", [2, cpu.LOOKUP_MAX_TOKENS + 3])
def test_float16_values_give_a_float16_bag_rounded_once(tokens):
    q, keys, values, swilu = _inputs(tokens, 2, 12, 8, 320, seed=7, values_dtype=torch.float16)
    with torch.inference_mode():
        bag = ops.pk_lookup(q, keys, values, 8)
        gated = ops.pk_lookup(q, keys, values, 8, swilu)
    assert bag.dtype == torch.float16 and gated.dtype == torch.float32
    expected = brute_force_lookup(q, keys, values, 8)
    torch.testing.assert_close(bag, expected.to(torch.float16), rtol=1e-3, atol=1e-3)
    # The kernel gates the float32 bag: no rounding to float16 before the product (the
    # reference's would be 5e-4 off)
    torch.testing.assert_close(gated.to(F64), brute_force_lookup(q, keys, values, 8, swilu),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("tokens", [1, cpu.LOOKUP_MAX_TOKENS + 3])
@pytest.mark.parametrize("gated", [False, True])
def test_bfloat16_lookup_rounds_where_the_reference_does(tokens, gated):
    """A bfloat16 layer's lookup (queries, keys, table and gate in bfloat16): the kernels
    read the 16-bit numbers as they are and sum in float32; the bag is rounded to bfloat16,
    and with the gate so are silu(gate) and the product, as the reference's ops (and the
    sharded lookups, which run them) round."""
    q, keys, values, swilu = (t.bfloat16() for t in _inputs(tokens, 2, 12, 8, 96, seed=9))
    calls = native.call_count("lookup")
    with torch.inference_mode():
        out = ops.pk_lookup(q, keys, values, 8, swilu if gated else None)
    assert native.call_count("lookup") == calls + 1
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, 96)
    bf16 = torch.bfloat16
    expected = brute_force_lookup(q, keys, values, 8).to(bf16).to(F64)
    if gated:
        silu = torch.nn.functional.silu(swilu.to(F64)).to(bf16).to(F64)
        expected = (expected * silu).to(bf16).to(F64)
    # within one bfloat16 step (2**-8 relative): a float32 bag may round to the neighbour of
    # float64's where the two straddle a rounding boundary
    torch.testing.assert_close(out.to(F64), expected, rtol=2**-8, atol=1e-6)


def test_one_row_picked_by_every_token_and_head():
    """Keys that make one product key the best for any query: all tokens and both heads
    read one row, each head with weight 1."""
    q, keys, values, _ = _inputs(4, 2, 8, 4, 16, seed=3)
    q = q.abs()
    keys[:, :, 5] = 10.0  # sub-key 5 of both halves dominates: row 5 * 8 + 5 for everyone
    with torch.inference_mode():
        out = ops.pk_lookup(q, keys, values, 1)
    torch.testing.assert_close(out, 2 * values[5 * 8 + 5].expand(4, 16), rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, cpu.LOOKUP_MAX_TOKENS + 3])
def test_nan_queries_give_nan_like_the_reference(tokens):
    """A token with a NaN in one head's query gets a NaN row; the others are unharmed."""
    q, keys, values, _ = _inputs(tokens, 2, 8, 4, 16, seed=5)
    q[0, 1] = float("nan")
    calls = native.call_count("lookup")
    with torch.inference_mode():
        out = ops.pk_lookup(q, keys, values, 4)
    assert native.call_count("lookup") == calls + 1
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()
    torch.testing.assert_close(out[1:].to(F64), brute_force_lookup(q[1:], keys, values, 4),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_many_tokens_on_torchs_threads_give_the_same_bits_on_any_count():
    """Beyond LOOKUP_MAX_TOKENS the tokens are split over torch's threads, each token's sums
    in one order: one thread and two give the same result."""
    q, keys, values, swilu = _inputs(64, 3, 16, 8, 96, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            one = ops.pk_lookup(q, keys, values, 8, swilu)
        torch.set_num_threads(2)
        with torch.inference_mode():
            two = ops.pk_lookup(q, keys, values, 8, swilu)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one.to(F64), brute_force_lookup(q, keys, values, 8, swilu),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "change", ["float64", "float16 queries", "non-contiguous values", "too few rows"]
)
def test_other_inputs_run_the_reference(change):
    q, keys, values, swilu = _inputs(2, 2, 8, 4, 16, seed=11)
    if change == "float64":
        q, keys, values, swilu = q.double(), keys.double(), values.double(), swilu.double()
    elif change == "float16 queries":
        q, keys, swilu = q.half(), keys.half(), swilu.half()
    elif change == "non-contiguous values":
        values = torch.randn(64, 32)[:, ::2]  # 64 rows of 16, every other column
    elif change == "too few rows":
        values = values[:10]
    calls = native.call_count("lookup")
    with torch.inference_mode():
        if change == "too few rows":
            with pytest.raises((IndexError, RuntimeError)):  # the reference refuses it
                ops.pk_lookup(q, keys, values, 4, swilu)
        else:
            out = ops.pk_lookup(q, keys, values, 4, swilu)
            expected = brute_force_lookup(q, keys, values, 4, swilu)
            torch.testing.assert_close(out.to(F64), expected, rtol=2e-2, atol=2e-2)
    assert native.call_count("lookup") == calls


def test_layer_at_decode_uses_the_kernel_and_matches_its_training_path():
    """A Memory+ layer at one token: inference (the C++ kernels: the whole layer in one
    call, test_cpu_decode.py) against the same layer with gradients on (pk_topk, softmax,
    bag and silu_gate, all PyTorch)."""
    config = MemoryConfig(mem_size=16**2, heads=4, knn=8, k_dim=32)
    layer = MemoryLayer(48, 48, config)
    x = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(0))
    calls = native.call_count("lookup"), native.call_count("decode")
    with torch.no_grad():
        fast = layer(x)
    assert (native.call_count("lookup"), native.call_count("decode")) == (calls[0], calls[1] + 1)
    slow = layer(x)  # parameters require grad: the separate, differentiable ops
    assert (native.call_count("lookup"), native.call_count("decode")) == (calls[0], calls[1] + 1)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)


def test_a_library_that_does_not_load_leaves_the_reference(monkeypatch, caplog):
    """A built library that cannot be loaded (a noexec cache, another toolchain's build):
    one warning, and the PyTorch lookup runs."""

    def refuse(path):
        raise OSError(f"{path}: failed to map segment from shared object")

    q, keys, values, swilu = _inputs(1, 2, 8, 4, 16, seed=4)
    calls = native.call_count("lookup")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native.ctypes, "CDLL", refuse)
    monkeypatch.setattr(cpu, "_kernels", None)
    with torch.inference_mode():
        out = ops.pk_lookup(q, keys, values, 4, swilu)
    assert cpu._kernels is False
    assert "do not load" in caplog.text
    torch.testing.assert_close(out.to(F64), brute_force_lookup(q, keys, values, 4, swilu),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    monkeypatch.undo()
    assert native.call_count("lookup") == calls


def test_without_the_library_the_reference_runs(monkeypatch):
    monkeypatch.setattr(cpu, "_kernels", False)  # as when no compiler built it
    q, keys, values, swilu = _inputs(1, 2, 8, 4, 16, seed=2)
    calls = native.call_count("lookup")
    with torch.inference_mode():
        out = ops.pk_lookup(q, keys, values, 4, swilu)
    assert native.call_count("lookup") == calls
    torch.testing.assert_close(out.to(F64), brute_force_lookup(q, keys, values, 4, swilu),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("where", ["module", "global", "forward"])
def test_hooked_projections_run_as_modules_at_inference(where):
    """Inference calls plain projections as F.linear; a forward hook, the projection's own
    or a global one, or a forward replaced on the instance (as accelerate's offload hooks
    do) must still run (here it doubles the query projection's output)."""
    layer = MemoryLayer(16, 16, MemoryConfig(mem_size=8**2, heads=2, knn=2, k_dim=8))
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    seen = []

    def double(module, args, out):
        if module is layer.query:
            seen.append(module)
            return out * 2

    if where == "module":
        undo = layer.query.register_forward_hook(double).remove
    elif where == "global":
        undo = torch.nn.modules.module.register_module_forward_hook(double).remove
    else:
        plain_forward = layer.query.forward
        layer.query.forward = lambda x: double(layer.query, (x,), plain_forward(x))

        def undo():
            del layer.query.forward

    try:
        with torch.no_grad():
            hooked = layer(x)
    finally:
        undo()
    assert seen == [layer.query]
    with torch.no_grad():
        layer.query.weight.mul_(2)
        layer.query.bias.mul_(2)
        torch.testing.assert_close(hooked, layer(x))
