"""Recognising the element-wise nodes of an FFN graph: activations and pass-throughs."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

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


def name_activation_module(module: nn.Module) -> str | None:
    """Name of an element-wise module, by probing it; None if it is not one. Scalar
    parameters are allowed (PReLU's slope, Apertus's xIELU), per-channel ones are not."""
    if any(p.numel() != 1 for p in module.parameters()):
        return None
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return None
    probe = torch.linspace(-5.0, 5.0, 64).reshape(2, 32)
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = module(probe)
            shuffled = module(probe.flatten()[permutation].reshape(2, 32))
            scaled = module(-2.0 * probe)
    except Exception:  # noqa: BLE001 - not callable on one tensor: not an activation
        return None
    finally:
        module.train(was_training)
    if not all(isinstance(t, torch.Tensor) and t.shape == probe.shape for t in (out, scaled)):
        return None
    if not torch.allclose(out.flatten()[permutation], shuffled.flatten()):
        return None
    if torch.allclose(scaled, -2.0 * out):
        return None  # linear (identity, a scale, dropout in eval): Linear -> it -> Linear is no FFN
    for name, curve in _REFERENCE_CURVES.items():
        if torch.allclose(out, curve(probe), atol=1e-4, rtol=1e-4):
            return name
    return type(module).__name__


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
