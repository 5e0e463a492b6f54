"""Recognising the element-wise nodes of an FFN graph: activations and pass-throughs."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..runtime.modes import training_mode

_FUNCTION_ACTIVATIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.silu: "silu",
    F.mish: "mish",
    F.relu6: "relu6",
    F.elu: "elu",
    F.leaky_relu: "leaky_relu",
    F.hardswish: "hardswish",
    F.softplus: "softplus",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    # ATen ops, as they appear in torch.export programs
    torch.ops.aten.relu.default: "relu",
    torch.ops.aten.silu.default: "silu",
    torch.ops.aten.tanh.default: "tanh",
    torch.ops.aten.sigmoid.default: "sigmoid",
    torch.ops.aten.mish.default: "mish",
}
_GELU = {F.gelu, torch.ops.aten.gelu.default}
_METHOD_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_PASS_THROUGH_FUNCTIONS = {
    F.dropout,
    torch.ops.aten.dropout.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.alias.default,
}
_PASS_THROUGH_METHODS = {"contiguous", "to", "type_as", "float"}
MULTIPLY = {operator.mul, torch.mul, "mul", torch.ops.aten.mul.Tensor}

# Reference curves an activation module is compared with, to name it.
_REFERENCE_CURVES = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu2": lambda x: F.relu(x) ** 2,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _name_curve(fn) -> str | None:
    """Name of the element-wise function `fn` computes, by probing it: a reference curve's
    name, else the fallback "" (the caller names it); None if it is not element-wise or is
    affine (identity, a scale, a shift, dropout in eval: Linear -> it -> Linear is no FFN)."""
    probe = torch.linspace(-5.0, 5.0, 64).reshape(2, 32)
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = fn(probe)
            shuffled = fn(probe.flatten()[permutation].reshape(2, 32))
            scaled = fn(-2.0 * probe)
            at_zero = fn(torch.zeros_like(probe))
    except Exception:  # noqa: BLE001 - not callable on one tensor: not an activation
        return None
    outputs = (out, shuffled, scaled, at_zero)
    if not all(isinstance(t, torch.Tensor) and t.shape == probe.shape for t in outputs):
        return None
    if not torch.allclose(out.flatten()[permutation], shuffled.flatten()):
        return None
    if torch.allclose(scaled - at_zero, -2.0 * (out - at_zero)):
        return None
    for name, curve in _REFERENCE_CURVES.items():
        if torch.allclose(out, curve(probe), atol=1e-4, rtol=1e-4):
            return name
    return ""


def name_activation_module(module: nn.Module) -> str | None:
    """Name of an element-wise module, by probing it; None if it is not one. Scalar
    parameters are allowed (PReLU's slope, Apertus's xIELU), per-channel ones are not."""
    if any(p.numel() != 1 for p in module.parameters()):
        return None
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return None
    param = next(module.parameters(), None)
    if param is None:
        run = module
    else:  # probe in the parameters' dtype and device, compare in float32

        def run(x: torch.Tensor) -> torch.Tensor:
            out = module(x.to(param.device, param.dtype))
            return out.float().cpu() if isinstance(out, torch.Tensor) else out

    with training_mode(module, training=False):
        name = _name_curve(run)
    return name or (None if name is None else type(module).__name__)


def pointwise_chain(root: nn.Module, node: fx.Node, is_source) -> tuple[str, fx.Node, list]:
    """(name, source, nodes) when `node` is computed from one `is_source` node by ATen
    point-wise ops and scalars alone: an activation that torch.export decomposed (GPT-2's
    gelu_new into mul/pow/tanh, quick_gelu into x * sigmoid(1.702 x)). None otherwise."""
    chain, sources, pending = [], set(), [node]
    while pending:
        current = pending.pop()
        if current in chain or current in sources:
            continue
        if is_source(current):
            sources.add(current)
            continue
        tags = getattr(current.target, "tags", ())
        if current.op != "call_function" or not (
            torch.Tag.pointwise in tags or is_pass_through(root, current)
        ):
            return None
        for arg in (*current.args, *current.kwargs.values()):
            if isinstance(arg, fx.Node):
                pending.append(arg)
            elif not isinstance(arg, (int, float, bool, type(None), torch.dtype)):
                return None
        chain.append(current)
    if len(sources) != 1 or not chain:
        return None
    (source,) = sources
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    chain.sort(key=order.__getitem__)

    def run(x: torch.Tensor) -> torch.Tensor:
        values = {source: x}
        for step in chain:
            args = fx.node.map_arg(step.args, values.__getitem__)
            kwargs = fx.node.map_arg(step.kwargs, values.__getitem__)
            values[step] = step.target(*args, **kwargs)
        return values[node]

    name = _name_curve(run)
    return None if name is None else (name or "pointwise", source, chain)


def activation_name(root: nn.Module, node: fx.Node) -> str | None:
    """The activation a node applies, or None if it is not an activation."""
    if node.op == "call_function":
        if node.target in _GELU:
            approximate = node.kwargs.get("approximate", "none")
            return "gelu_tanh" if approximate == "tanh" else "gelu"
        return _FUNCTION_ACTIVATIONS.get(node.target)
    if node.op == "call_method":
        return _METHOD_ACTIVATIONS.get(node.target)
    module = _module(root, node)
    return None if module is None else name_activation_module(module)


def is_pass_through(root: nn.Module, node: fx.Node) -> bool:
    """Dropout, identity and casts: nodes an FFN may have between its parts."""
    if node.op == "call_function":
        return node.target in _PASS_THROUGH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    module = _module(root, node)
    return isinstance(module, (nn.Dropout, nn.Identity))


def skip_back(root: nn.Module, node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk from `node` back through pass-through nodes; returns the first other node."""
    skipped = []
    while isinstance(node, fx.Node) and is_pass_through(root, node) and node.args:
        skipped.append(node)
        node = node.args[0]
    return node, skipped
