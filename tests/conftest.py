"""Shared fixtures, and the Triton mode for the whole run."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at import whether its functions are interpreted. Without a GPU the kernel
# tests run through the interpreter, so it must be on before any test (or torch.compile)
# imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
