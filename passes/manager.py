"""The pass manager: runs passes, each `f(state) -> None`, in order over one TransformState."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

from torch import fx, nn

from .blocks import TransformState
from .capture import capture
from .find_ffn import find_ffn
from .rewrite import rewrite
from .select import select
from .share import share
from .verify import verify

log = logging.getLogger(__name__)

Pass = Callable[[TransformState], None]

FIND_PASSES: tuple[Pass, ...] = (capture, find_ffn)
TRANSFORM_PASSES: tuple[Pass, ...] = (capture, find_ffn, select, rewrite, share, verify)


def run_passes(state: TransformState, passes: Sequence[Pass] = TRANSFORM_PASSES) -> TransformState:
    """Run `passes` in order. If one raises, the model is put back as it was: a table that
    does not fit in memory, found at the second block, must not leave the first converted
    (and the model's record of its transforms without it)."""
    with _unchanged_on_error(state.model):
        for p in passes:
            log.debug("pass %s", p.__name__)
            p(state)
    return state


@contextlib.contextmanager
def _unchanged_on_error(model: nn.Module) -> Iterator[None]:
    # Passes rebind children, parameters and buffers, and edit fx graphs in place; they do
    # not write into existing tensors, so the bindings and the graphs are the whole state.
    bindings = [
        (
            m,
            dict(m._modules),
            dict(m._parameters),
            dict(m._buffers),
            set(m._non_persistent_buffers_set),
        )
        for m in model.modules()
    ]
    with warnings.catch_warnings():
        # Copying a graph's pytree codegen trips torch's own LeafSpec deprecation (2.13).
        warnings.simplefilter("ignore", FutureWarning)
        graphs = [
            (m, copy.deepcopy(m.graph)) for m in model.modules() if isinstance(m, fx.GraphModule)
        ]
    try:
        yield
    except BaseException:
        for module, modules, parameters, buffers, non_persistent in bindings:
            module._modules.clear()
            module._modules.update(modules)
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            module._non_persistent_buffers_set = non_persistent
        for module, graph in graphs:
            module.graph = graph
        raise
