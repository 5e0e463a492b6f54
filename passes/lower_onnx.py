"""Lowering: `memcompile::pk_topk` and `memcompile::bag` to ONNX, for `torch.onnx.export`.

The dynamo-based exporter takes a `custom_translation_table`; `translation_table(form)` is
that table, in one of two forms:

- "decomposed": each op becomes standard ONNX ops (Cast, Transpose, MatMul, TopK, Add, Mul,
  Reshape, GatherElements, Gather, Squeeze), so any ONNX Runtime execution provider runs it.
- "custom": each op becomes one node of the domain `com.memcompile` (`PkTopK` with a `knn`
  attribute, `Bag`); `attach_functions` then gives the model an ONNX function for each,
  with the decomposed body, so a plain ONNX Runtime still runs the model, while
  `memcompile.runtime.ort_session` registers native kernels for the two nodes.

Both compute what `kernels/reference.py` computes: scores in float32, indices
`i * n_keys + j`, the bag accumulated in float32 and cast back to the table's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, Union

import onnx
import onnxscript
from onnxscript import BFLOAT16, FLOAT, FLOAT16, INT64, ir
from onnxscript import opset18 as op

DOMAIN = "com.memcompile"
DOMAIN_VERSION = 1
FORMS = ("decomposed", "custom")
# The exporter's torchlib targets opset 18; torch.onnx converts up to 23.
MIN_OPSET, MAX_OPSET = 18, 23
DEFAULT_OPSET = 20  # torch.onnx's default

_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
_INT64_MAX = 9223372036854775807

# The dtype of a value table (and of the bag it returns).
# (onnxscript reads typing.Union bounds, as torchlib writes them.)
TTable = TypeVar("TTable", bound=Union[FLOAT, FLOAT16, BFLOAT16])  # noqa: UP007

_memcompile = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


@onnxscript.script(_memcompile, default_opset=op)
def PkTopK(q, keys, knn: int) -> tuple[FLOAT, INT64]:  # noqa: N802 - an ONNX op name
    """q (N, H, k_dim), keys (H, 2, n_keys, k_dim/2) -> scores, indices (N, H, knn)."""
    k = op.Reshape(op.Constant(value_int=knn), op.Constant(value_ints=[1]))
    last = op.Constant(value_ints=[2])
    half = op.Shape(keys, start=3, end=4)
    n_keys = op.Shape(keys, start=2, end=3)
    keys32 = op.Cast(keys, to=FLOAT.dtype)
    qh = op.Transpose(op.Cast(q, to=FLOAT.dtype), perm=[1, 0, 2])  # (H, N, k_dim)
    q1 = op.Slice(qh, op.Constant(value_ints=[0]), half, last)
    q2 = op.Slice(qh, half, op.Constant(value_ints=[_INT64_MAX]), last)
    k1 = op.Transpose(op.Gather(keys32, op.Constant(value_int=0), axis=1), perm=[0, 2, 1])
    k2 = op.Transpose(op.Gather(keys32, op.Constant(value_int=1), axis=1), perm=[0, 2, 1])
    v1, i1 = op.TopK(op.MatMul(q1, k1), k, axis=-1)
    v2, i2 = op.TopK(op.MatMul(q2, k2), k, axis=-1)
    candidates = op.Add(op.Unsqueeze(v1, [-1]), op.Unsqueeze(v2, [-2]))
    ids = op.Add(op.Mul(op.Unsqueeze(i1, [-1]), n_keys), op.Unsqueeze(i2, [-2]))
    flat = op.Constant(value_ints=[0, 0, -1])
    top, best = op.TopK(op.Reshape(candidates, flat), k, axis=-1)
    picked = op.GatherElements(op.Reshape(ids, flat), best, axis=-1)
    scores = op.Transpose(top, perm=[1, 0, 2])
    indices = op.Transpose(picked, perm=[1, 0, 2])
    return scores, indices


@onnxscript.script(_memcompile, default_opset=op)
def Bag(values: TTable, indices: INT64, weights) -> TTable:  # noqa: N802 - an ONNX op name
    """values (rows, v_dim), indices and weights (N, B) -> (N, v_dim) in values' dtype."""
    rows = op.Cast(op.Gather(values, indices, axis=0), to=FLOAT.dtype)
    w = op.Unsqueeze(op.Cast(weights, to=FLOAT.dtype), [1])
    y = op.Squeeze(op.MatMul(w, rows), [1])
    return op.CastLike(y, values)


def _schema(name, inputs, outputs, constraints, attributes=()) -> onnx.defs.OpSchema:
    param = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[param(n, t) for n, t in inputs],
        outputs=[param(n, t) for n, t in outputs],
        type_constraints=[(t, list(_FLOAT_TYPES), "") for t in constraints],
        attributes=list(attributes),
    )


# The custom nodes, with schemas so the exporter's tracer records them as plain nodes.
_PK_TOPK_NODE = onnxscript.values.Op(
    _memcompile,
    "PkTopK",
    _schema(
        "PkTopK",
        [("q", "Q"), ("keys", "K")],
        [("scores", "tensor(float)"), ("indices", "tensor(int64)")],
        ["Q", "K"],
        [onnx.defs.OpSchema.Attribute("knn", onnx.defs.OpSchema.AttrType.INT)],
    ),
)
_BAG_NODE = onnxscript.values.Op(
    _memcompile,
    "Bag",
    _schema(
        "Bag",
        [("values", "T"), ("indices", "tensor(int64)"), ("weights", "W")],
        [("y", "T")],
        ["T", "W"],
    ),
)


def _pk_topk_decomposed(q, keys, knn: int):
    return PkTopK.function(q, keys, knn)


def _bag_decomposed(values, indices, weights):
    return Bag.function(values, indices, weights)


def _pk_topk_custom(q, keys, knn: int):
    return _PK_TOPK_NODE(q, keys, knn=knn)


def _bag_custom(values, indices, weights):
    return _BAG_NODE(values, indices, weights)


def translation_table(form: str) -> dict[Callable, Callable]:
    """The `custom_translation_table` for `torch.onnx.export(dynamo=True)` in `form`."""
    import torch

    from ..kernels import ops  # noqa: F401 - defines torch.ops.memcompile

    if form not in FORMS:
        raise ValueError(f"unknown ONNX form {form!r}: choose one of {', '.join(FORMS)}")
    custom = form == "custom"
    return {
        torch.ops.memcompile.pk_topk.default: _pk_topk_custom if custom else _pk_topk_decomposed,
        torch.ops.memcompile.bag.default: _bag_custom if custom else _bag_decomposed,
    }


def function_protos(opset: int) -> list[onnx.FunctionProto]:
    """The ONNX functions of the custom nodes, importing the standard opset `opset`.

    Their ops (Cast, Transpose, MatMul, TopK...) mean the same from opset 18 to 23.
    """
    protos = []
    for function in (PkTopK, Bag):
        proto = function.to_function_proto()
        for entry in proto.opset_import:
            if entry.domain == "":
                entry.version = opset
        protos.append(proto)
    return protos


def attach_functions(model: ir.Model) -> None:
    """Give `model` the function bodies of the `com.memcompile` nodes it uses."""
    used = {node.op_type for node in model.graph.all_nodes() if node.domain == DOMAIN}
    if not used:
        return
    for proto in function_protos(model.opset_imports[""]):
        if proto.name in used:
            function = ir.serde.deserialize_function(proto)
            model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = DOMAIN_VERSION


def custom_nodes(model: ir.Model) -> dict[str, int]:
    """How many nodes of each `com.memcompile` op type the model's graph holds."""
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
