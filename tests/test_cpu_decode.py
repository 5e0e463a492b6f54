"""A memory layer's whole forward in one C++ call at a few tokens on the CPU
(kernels/cpu.py `decode`, kernels/decode_kernels.cc) against the same layer in float64,
which runs the PyTorch ops (kernels/reference.py). The library counts its calls, so each
test also checks which path ran, and where the call steps aside."""

from __future__ import annotations

import copy
import multiprocessing

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import memcompile
from memcompile.kernels import cpu, native
from memcompile.runtime import MemoryConfig, MemoryLayer

from models import CASES, VOCAB, build

F64 = torch.float64


def _layer(gating="swilu", d=48, heads=4, knn=8, n_keys=16, **config):
    config = MemoryConfig(mem_size=n_keys**2, heads=heads, knn=knn, k_dim=32, gating=gating,
                          **config)  # fmt: skip
    layer = MemoryLayer(d, d, config).eval()
    with torch.no_grad():  # nonzero biases, so that a dropped bias shows
        for name, param in layer.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return layer


def _in_float64(layer, x):
    """The layer's output in float64: its PyTorch ops (the C++ kernels take float32)."""
    with torch.no_grad():
        return copy.deepcopy(layer).double()(x.double())


def _run(layer, x, grad=False):
    """(output, decode calls, lookup calls) of layer(x)."""
    decodes, lookups = native.call_count("decode"), native.call_count("lookup")
    with torch.set_grad_enabled(grad):
        out = layer(x)
    return out, native.call_count("decode") - decodes, native.call_count("lookup") - lookups


@pytest.fixture(autouse=True)
def _kernels_built():
    assert cpu._native(), "a C++17 compiler is on the test machine"


@pytest.mark.parametrize("tokens", [1, 3, cpu.MAX_TOKENS])
@pytest.mark.parametrize(
    "shape",
    [
        dict(gating="swilu", heads=4, knn=8),
        dict(gating="swilu", heads=3, knn=1, d=40),  # d_model not a multiple of 16
        dict(gating="none", heads=2, knn=5, d=96),  # no projections but the query's
    ],
)
def test_the_layer_in_one_call_matches_float64(tokens, shape):
    layer = _layer(**shape)
    x = torch.randn(tokens, shape.get("d", 48), generator=torch.Generator().manual_seed(tokens))
    out, decodes, lookups = _run(layer, x)
    assert (decodes, lookups) == (1, 0)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.to(F64), _in_float64(layer, x), rtol=1e-5, atol=1e-5)


def test_the_augment_gate_multiplies_the_bag():
    """gating 'none' with augment=True: output = gate * bag, the gate a scalar parameter."""
    layer = MemoryLayer(32, 32, MemoryConfig(mem_size=8**2, heads=2, knn=4, k_dim=16,
                                             gating="none"), augment=True).eval()  # fmt: skip
    with torch.no_grad():
        layer.gate.fill_(0.75)
    x = torch.randn(2, 32)
    out, decodes, _ = _run(layer, x)
    assert decodes == 1
    torch.testing.assert_close(out.to(F64), _in_float64(layer, x), rtol=1e-5, atol=1e-5)
    assert out.abs().max() > 0


def test_a_projection_without_bias():
    layer = _layer()
    query = nn.Linear(48, layer.query.out_features, bias=False)
    with torch.no_grad():
        query.weight.copy_(layer.query.weight)
    layer.query = query
    x = torch.randn(2, 48)
    out, decodes, _ = _run(layer, x)
    assert decodes == 1
    torch.testing.assert_close(out.to(F64), _in_float64(layer, x), rtol=1e-5, atol=1e-5)


def test_float16_values_are_summed_and_gated_in_float32():
    """A float16 table: the call sums and gates in float32 and rounds nothing (as
    pk_lookup's kernels may), so it matches float64 on the same table closely; the layer's
    ops round the bag to float16 before the gate, within float16's precision of it."""
    layer = _layer(n_keys=12)
    layer.values = nn.Parameter(layer.values.detach().half())
    x = torch.randn(2, 48)
    out, decodes, _ = _run(layer, x)
    assert decodes == 1
    expected = _in_float64(layer, x)
    torch.testing.assert_close(out.to(F64), expected, rtol=1e-5, atol=1e-5)
    with cpu.pytorch_only():  # the PyTorch ops, in float32 with the same float16 table
        on_ops, *_ = _run(layer, x)
    torch.testing.assert_close(on_ops.to(F64), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("tokens", [1, cpu.MAX_TOKENS])
@pytest.mark.parametrize("gating", ["swilu", "none"])
def test_a_bfloat16_layer_rounds_where_its_ops_round(tokens, gating):
    """All bfloat16 (projections, keys, table, input): the call reads the 16-bit weights
    as they are, sums in float32 and rounds to bfloat16 where the layer's PyTorch ops round
    (each projection's output, the bag, silu(gate) and the gated product), so it gives the
    ops' result, to one bfloat16 step where a float32 sum straddles a rounding boundary."""
    layer = _layer(gating=gating).to(torch.bfloat16)
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(7)).bfloat16()
    out, decodes, _ = _run(layer, x)
    assert decodes == 1 and out.dtype == torch.bfloat16
    with cpu.pytorch_only():  # the PyTorch ops (kernels/reference.py) in bfloat16
        on_ops, *_ = _run(layer, x)
    torch.testing.assert_close(out.to(F64), on_ops.to(F64), rtol=2**-7, atol=1e-3)
    assert (out != on_ops).float().mean() < 0.05  # almost all identical


@pytest.mark.parametrize("tokens", [1, cpu.MAX_TOKENS])
def test_autocast_runs_the_ops_in_its_dtype(tokens):
    """Under CPU autocast the one-call path (float32) stands aside: the layer computes as its
    ops do under autocast with gradients on, not as in float32."""
    layer = _layer()
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, decodes, _ = _run(layer, x)
        with_grad, *_ = _run(layer, x, grad=True)
    assert decodes == 0
    torch.testing.assert_close(out, with_grad.detach(), rtol=1e-2, atol=5e-3)
    in_float32, *_ = _run(layer, x)
    assert not torch.allclose(out, in_float32, rtol=1e-2, atol=5e-3)


def _hooked(layer):
    layer.out.register_forward_hook(lambda module, args, out: out * 2)
    return layer


def _noncontiguous_query(layer):
    weight = layer.query.weight.detach()
    layer.query.weight = nn.Parameter(weight.t().contiguous().t())  # same values, transposed
    return layer


@pytest.mark.parametrize(
    "case,make,tokens,grad",
    [
        ("gradients", _layer, 1, True),
        ("more tokens", _layer, cpu.MAX_TOKENS + 1, False),
        ("hooked projection", lambda: _hooked(_layer()), 1, False),
        ("query norm", lambda: _layer(qk_norm=True), 1, False),
        ("float64 layer", lambda: _layer().double(), 1, False),
        ("non-contiguous weight", lambda: _noncontiguous_query(_layer()), 1, False),
    ],
)
def test_where_the_call_steps_aside_the_ops_run(case, make, tokens, grad):
    layer = make()
    x = torch.randn(tokens, 48, dtype=layer.keys.dtype)
    out, decodes, _ = _run(layer, x, grad)
    assert decodes == 0, case
    torch.testing.assert_close(out.detach().to(F64), _in_float64(layer, x), rtol=1e-5, atol=1e-5)


def test_under_a_dispatch_mode_the_ops_run_and_are_seen():
    """FlopCounterMode sees torch's ops at the dispatcher: the call would hide them."""
    layer, x = _layer(), torch.randn(1, 48)
    with FlopCounterMode(display=False) as flops:
        out, decodes, _ = _run(layer, x)
    assert decodes == 0 and flops.get_total_flops() > 0
    torch.testing.assert_close(out.to(F64), _in_float64(layer, x), rtol=1e-5, atol=1e-5)


def test_torchs_threads_run_it_with_the_same_result_on_any_count():
    """The library shares torch's OpenMP runtime (one in the process, torch's copy), so the
    call runs on torch's threads; the split (rows of a weight, columns of the bag) leaves
    each output's sums in one order, so one thread and two give the same bits."""
    layer, x = _layer(d=64), torch.randn(3, 64)
    _run(layer, x)
    (runtime,) = native.openmp_runtimes()
    assert "torch" in runtime and native.shares_torch_openmp()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, *_ = _run(layer, x)
        torch.set_num_threads(2)
        two, decodes, _ = _run(layer, x)
    finally:
        torch.set_num_threads(threads)
    assert decodes == 1 and torch.equal(one, two)


def test_a_second_openmp_runtime_keeps_the_kernels_on_one_thread(monkeypatch):
    """A library whose libgomp is not torch's (conda's Intel OpenMP beside it, say) would
    start a pool of its own: then the kernels run on one thread."""
    check = native.shares_torch_openmp.__wrapped__  # uncached
    assert check()
    second = {"/opt/torch/lib/libiomp5.so", "/usr/lib/libgomp.so.1"}
    monkeypatch.setattr(native, "openmp_runtimes", lambda: second)
    assert not check()
    monkeypatch.setattr(native, "shares_torch_openmp", check)
    assert cpu._threads() == 1


def _decode_in_worker(layer, x, results):
    torch.set_num_threads(1)  # as DataLoader workers do: torch's pool does not survive a fork
    out, decodes, _ = _run(layer, x)
    results.put((out.tolist(), decodes))  # plain lists: no tensor sharing between processes


def test_a_forked_worker_runs_it_after_the_parent_did():
    """The parent ran the call on two threads; a forked worker (one thread, as torch
    needs) runs it again: no second OpenMP pool started by the library to hang it."""
    layer, x = _layer(), torch.randn(1, 48)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected, decodes, _ = _run(layer, x)
    finally:
        torch.set_num_threads(threads)
    assert decodes == 1
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    worker = context.Process(target=_decode_in_worker, args=(layer, x, results))
    worker.start()
    out, child_decodes = results.get(timeout=60)
    worker.join(timeout=60)
    assert worker.exitcode == 0 and child_decodes == 1
    assert torch.equal(torch.tensor(out), expected)


def test_a_converted_llama_generates_the_tokens_of_pytorch_alone():
    """Greedy decoding of a converted Llama: its memory layers take the one-call path at
    every new token (batch 2, so two tokens a call) and give the tokens the same model
    gives on PyTorch alone."""
    llama = next(c for c in CASES if c.name == "llama")
    model = memcompile.transform(build(llama), layers=[0, 2], mem_size="4K", knn=4, heads=2)
    model = model.float().eval()
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                    do_sample=False, pad_token_id=0)  # fmt: skip
    decodes = native.call_count("decode")
    with torch.no_grad():
        fast = model.generate(ids, **settings)
    assert native.call_count("decode") - decodes == 2 * 5  # two layers, five decode steps
    with cpu.pytorch_only(), torch.no_grad():
        slow = model.generate(ids, **settings)
    assert torch.equal(fast, slow)
