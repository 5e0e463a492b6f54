"""A Triton kernel that cannot be built for the GPU at hand (more shared memory than it
has, a compile error) is reported once, and its op runs the PyTorch reference from then
on, with nothing written by the failed attempt. Simulated on the CPU: the Triton entry
points are replaced by ones that fail as Triton does, before launching anything."""

from __future__ import annotations

import logging

import pytest
import torch
from triton.runtime.errors import OutOfResources

from memcompile.kernels import cuda, fused_update, reference, triton_bag, triton_update


def _out_of_shared_memory(*args, **kwargs):
    raise OutOfResources(262144, 232448, "shared memory")


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cuda, "_ON_REFERENCE", set())


def test_a_kernel_that_cannot_be_built_falls_back_once_and_says_so(fresh, monkeypatch, caplog):
    tries = []

    def bag_forward(*args):
        tries.append(args)
        _out_of_shared_memory()

    monkeypatch.setattr(triton_bag, "bag_forward", bag_forward)
    g = torch.Generator().manual_seed(0)
    values, weights = torch.randn(20, 8, generator=g), torch.rand(3, 4, generator=g)
    indices = torch.randint(0, 20, (3, 4), generator=g)
    with caplog.at_level(logging.WARNING, logger="memcompile.kernels.cuda"):
        first = cuda.bag_cuda(values, indices, weights)
        second = cuda.bag_cuda(values, indices, weights)
    want = reference.bag(values, indices, weights)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert len(tries) == 1  # not tried again
    warnings = [r.getMessage() for r in caplog.records if "cannot be built" in r.getMessage()]
    assert len(warnings) == 1 and "OutOfResources" in warnings[0] and "bag" in warnings[0]


def test_a_fused_update_whose_kernel_cannot_be_built_steps_the_table_once(fresh, monkeypatch):
    # Row-wise Adagrad with row norms from outside: its row states are advanced before the
    # update pass. When that pass cannot be built, the reference must find the states
    # as they were, or they would be advanced twice.
    monkeypatch.setattr(triton_update, "row_pass", _out_of_shared_memory)
    g = torch.Generator().manual_seed(1)
    values = torch.randn(12, 6, generator=g)
    state = torch.rand(12, generator=g)
    indices = torch.randint(0, 12, (4, 3), generator=g)
    weights, grad_out = torch.rand(4, 3, generator=g), torch.randn(4, 6, generator=g)
    row_sq = fused_update.row_grad_sq_reference(values, indices, weights, grad_out)
    hyper = (row_sq, None, "rowwise_adagrad", 0.1, 1e-8, 0.9, 0.999, 0.0, 6, 1, 3, False, True)
    ref_values, ref_state = values.clone(), state.clone()
    want_w = fused_update.fused_row_update_reference(
        ref_values, ref_state, ref_state, indices, weights, grad_out, *hyper
    )
    got_w = cuda.fused_row_update_cuda(values, state, state, indices, weights, grad_out, *hyper)
    assert torch.equal(state, ref_state) and torch.equal(values, ref_values)
    assert torch.equal(got_w, want_w)


def test_programmatic_dependent_launch_only_for_small_grids_on_hopper(monkeypatch):
    # A few-token kernel's grid on an H100 (132 SMs) takes PDL; a grid of more than two
    # programs an SM, an older GPU, a CPU tensor, or PDL turned off does not.
    from memcompile.kernels import pdl

    gpus = {0: (9, 132), 1: (8, 108)}  # an H100 and an A100, without CUDA here
    monkeypatch.setattr(pdl, "_architecture", gpus.__getitem__)
    hopper, ampere = torch.device("cuda", 0), torch.device("cuda", 1)
    assert pdl.use_pdl(hopper, 264) and not pdl.use_pdl(hopper, 265)
    assert not pdl.use_pdl(ampere, 4)
    assert not pdl.use_pdl(torch.device("cpu"), 4)
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.use_pdl(hopper, 4)
