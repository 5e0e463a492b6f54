"""Capture: FX graphs to search for FFNs.

Whole-model symbolic tracing fails on most real models, so each module that holds a
projection is traced alone, with its children as leaves: an FFN module always traces, and
a parent's graph shows its children as single `call_module` nodes. A model that already is
an `fx.GraphModule` is searched as one graph.
"""

from __future__ import annotations

import inspect
import logging

import torch.fx as fx
from torch import nn

from ..runtime.wrappers import CONVERTED_MARK
from .blocks import Capture, TransformState

log = logging.getLogger(__name__)


def is_projection(module: nn.Module) -> bool:
    """nn.Linear, or a Conv1D as GPT-2 uses (a linear layer with a transposed weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


class LeafTracer(fx.Tracer):
    """Traces one module and stops at its children: each becomes a `call_module` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_module(module: nn.Module) -> fx.GraphModule | None:
    """The module's forward as a graph over its children, or None if it does not trace.

    Arguments with defaults are fixed to their defaults, so Python control flow on flags
    such as `use_cache=False` traces.
    """
    params = list(inspect.signature(module.forward).parameters.values())
    concrete = {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    try:
        graph = LeafTracer().trace(module, concrete_args=concrete or None)
    except Exception as error:  # noqa: BLE001 - arbitrary user code: any failure means "skip"
        log.debug("not traceable alone: %s (%s)", type(module).__name__, error)
        return None
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def _converted_subtrees(model: nn.Module) -> set[str]:
    return {path for path, m in model.named_modules() if getattr(m, CONVERTED_MARK, False)}


def capture(state: TransformState) -> None:
    """Fill `state.captures` with the graphs to search."""
    model = state.model
    if isinstance(model, fx.GraphModule):
        state.captures = [Capture("", model, model, whole_model=True)]
        return
    skip = _converted_subtrees(model)
    captures = []
    for path, module in model.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if not any(is_projection(child) for child in module.children()):
            continue
        graph_module = trace_module(module)
        if graph_module is not None:
            captures.append(Capture(path, module, graph_module))
    log.info("captured %d module graphs", len(captures))
    state.captures = captures
