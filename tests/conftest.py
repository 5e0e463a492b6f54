"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernels_built():
    """Fails a test in which a Triton kernel could not be built and its op ran the PyTorch
    reference instead (kernels/cuda.py falls back there on a GPU): the test would compare
    the reference with itself."""
    from memcompile.kernels import cuda

    cuda.take_unbuilt()  # each test tries the kernels it calls
    yield
    unbuilt = cuda.take_unbuilt()
    assert not unbuilt, f"Triton kernels not built for: {unbuilt}"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small Llama (tests/models.py) saved as an HF model directory."""
    from models import CASES, build

    path = tmp_path_factory.mktemp("hf") / "llama"
    build(next(c for c in CASES if c.name == "llama")).save_pretrained(path)
    return path
