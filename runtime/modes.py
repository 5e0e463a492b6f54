"""Train/eval switches that give every module its own flag back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def training_mode(*modules: nn.Module, training: bool) -> Iterator[None]:
    """Puts `modules` (children included) in train or eval mode for the block, then restores
    each module's own flag: `module.train(was_training)` would flatten a model that keeps
    some submodules in eval mode (frozen norms, say) to the root's flag."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.train(training)
        yield
    finally:
        for module, flag in flags:
            module.training = flag
