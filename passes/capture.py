"""Capture: FX graphs to search for FFNs.

Whole-model symbolic tracing fails on most real models, so each module that holds a
projection is traced alone, with its children as leaves: an FFN module always traces, and
a parent's graph shows its children as single `call_module` nodes. A model that already is
an `fx.GraphModule` is searched as one graph.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator

import torch
import torch.fx as fx
from torch import nn

from ..runtime.wrappers import CONVERTED_MARK
from .blocks import Capture, TransformState, inside

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


# Set on a traced graph module whose forward branched on a tensor's dtype (see LeafTracer).
ASSUMED_DTYPE = "memcompile_assumed_dtype"


def _float_dtype(module: nn.Module) -> torch.dtype:
    floats = (p.dtype for p in module.parameters() if p.is_floating_point())
    return next(floats, torch.get_default_dtype())


class LeafTracer(fx.Tracer):
    """Traces one module and stops at its children: each becomes a `call_module` node.

    A branch on `x.dtype == torch.float16` (BART's and Whisper's layers clamp float16
    overflow) is taken as if `x` had dtype `dtype`, so such layers still trace; the graph
    then holds for that dtype only, and `assumed_dtype` records it.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        # No dtype (as when pickle rebuilds a traced graph, calling the class with no
        # arguments): dtype branches are not taken, as in plain fx.
        super().__init__()
        self.dtype = dtype
        self.assumed_dtype: torch.dtype | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def to_bool(self, obj: fx.Proxy) -> bool:
        node = obj.node
        if node.op == "call_function" and node.target in (operator.eq, operator.ne):
            left, right = node.args
            dtype, other = (right, left) if isinstance(right, torch.dtype) else (left, right)
            reads_dtype = (
                isinstance(other, fx.Node)
                and other.op == "call_function"
                and other.target is getattr
                and other.args[1:] == ("dtype",)
            )
            if self.dtype is not None and isinstance(dtype, torch.dtype) and reads_dtype:
                self.assumed_dtype = self.dtype
                return (self.dtype == dtype) == (node.target is operator.eq)
        return super().to_bool(obj)


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    return list(inspect.signature(module.forward).parameters.values())


def is_specialized(module: nn.Module) -> bool:
    """True when tracing fixes some of the forward's arguments (defaults, *args, **kwargs):
    its graph is then right for default calls only, so it must not replace the module."""
    return any(p.default is not p.empty or p.kind in _VARIADIC for p in _forward_parameters(module))


@contextlib.contextmanager
def _without_variadic_arguments(module: nn.Module):
    """Temporarily give the module a forward without *args/**kwargs, which fx cannot trace
    (a `**kwargs` proxy cannot be unpacked); the original forward runs with none of them."""
    params = _forward_parameters(module)
    if not any(p.kind in _VARIADIC for p in params):
        yield
        return
    cls = type(module)
    named = [p for p in params if p.kind in _NAMED]
    defaults = {p.name: p.default for p in named if p.default is not p.empty}
    signature = ", ".join(
        f"{p.name}=_defaults[{p.name!r}]" if p.name in defaults else p.name for p in named
    )
    call = ", ".join(f"{p.name}={p.name}" for p in named)
    namespace = {"_defaults": defaults, "_original": cls.forward}
    exec(f"def forward(self, {signature}):\n    return _original(self, {call})", namespace)
    module.__class__ = type(cls.__name__, (cls,), {"forward": namespace["forward"]})
    try:
        yield
    finally:
        module.__class__ = cls


def trace_module(module: nn.Module) -> fx.GraphModule | None:
    """The module's forward as a graph over its children, or None if it does not trace.

    Arguments with defaults are fixed to their defaults (so Python control flow on flags
    such as `use_cache=False` traces) and *args/**kwargs are left out: see `is_specialized`.
    Branches on an input's dtype assume the module's dtype, or float32 when that branch
    does not trace (BART's float16-only clamp): see `LeafTracer`.
    """
    dtype = _float_dtype(module)
    for assumed in dict.fromkeys([dtype, torch.float32]):
        tracer = LeafTracer(assumed)
        graph_module = _trace(module, tracer)
        if graph_module is not None or tracer.assumed_dtype is None:
            return graph_module
    return None


def _trace(module: nn.Module, tracer: LeafTracer) -> fx.GraphModule | None:
    try:
        with _without_variadic_arguments(module):
            concrete = {
                p.name: p.default
                for p in _forward_parameters(module)[1:]
                if p.default is not p.empty and p.kind in _NAMED
            }
            graph = tracer.trace(module, concrete_args=concrete or None)
            graph_module = fx.GraphModule(module, graph, class_name=type(module).__name__)
            setattr(graph_module, ASSUMED_DTYPE, tracer.assumed_dtype)
            return graph_module
    except Exception as error:  # noqa: BLE001 - arbitrary user code: any failure means "skip"
        log.debug("not traceable alone: %s (%s)", type(module).__name__, error)
        return None


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
        if any(inside(path, s) for s in skip):
            continue
        if not any(is_projection(child) for child in module.children()):
            continue
        graph_module = trace_module(module)
        if graph_module is not None:
            captures.append(Capture(path, module, graph_module))
    log.info("captured %d module graphs", len(captures))
    state.captures = captures
