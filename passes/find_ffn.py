"""find_ffn: FFN patterns in the captured graphs, and their block indices.

Patterns, each ending in an output projection `down`:
  mlp          down(act(up(x)))                      GELU/ReLU/SiLU MLPs, GPT-2's Conv1D MLP
  gated        down(act(gate(x)) * up(x))            SwiGLU, GeGLU
  fused_gated  down(act(a) * b), a, b = gate_up(x).chunk(2, -1)     Phi-3
  split        up+act in one module, down in its sibling           BERT's intermediate/output
Dropout, identity and casts may sit between the parts. In torch.export programs an
activation may be a chain of point-wise ATen ops, and a Conv1D is view/addmm/view.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ..runtime import MemoryLayer
from ..runtime.wrappers import CONVERTED_MARK
from .activations import MULTIPLY, activation_name, pointwise_chain, skip_back
from .blocks import Capture, FFNBlock, FFNMatch, TransformState, inside
from .capture import is_projection, projection_shape
from .moe import find_moe_blocks

log = logging.getLogger(__name__)

_LINEAR_FUNCTIONS = {torch.nn.functional.linear, torch.ops.aten.linear.default}
_CHUNKS = {"chunk", torch.chunk, torch.ops.aten.chunk.default}
_VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
}


class _Matcher:
    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.root = capture.graph_module

    def projection(self, node: fx.Node) -> tuple[int, int] | None:
        """(in, out) features if the node is a projection: a Linear/Conv1D module call, or
        in torch.export programs `aten.linear(x, weight, bias)` on parameters or GPT-2's
        Conv1D as `view(addmm(bias, view(x), weight))`."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            return projection_shape(module) if is_projection(module) else None
        if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS and len(node.args) > 1:
            shape = self._parameter_shape(node.args[1])
            return (shape[1], shape[0]) if shape is not None else None
        addmm = self._addmm(node)
        return self._parameter_shape(addmm.args[2]) if addmm is not None else None

    def _parameter_shape(self, node) -> tuple[int, int] | None:
        """The shape of a 2-d parameter named `weight` (a module's projection weight)."""
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return None
        if node.target.rpartition(".")[2] != "weight":
            return None  # a raw parameter, not a projection module's weight
        try:
            shape = self.root.get_parameter(node.target).shape
        except AttributeError:
            return None  # a buffer or a constant: nothing to train
        return tuple(shape) if len(shape) == 2 else None

    @staticmethod
    def _addmm(node: fx.Node) -> fx.Node | None:
        """The addmm of `view(addmm(bias, view(x), weight))` applying the weight to x's last
        dimension and keeping its leading ones (Conv1D), else None."""
        if node.op != "call_function" or node.target not in _VIEWS:
            return None
        addmm = node.args[0]
        if not (isinstance(addmm, fx.Node) and addmm.target is torch.ops.aten.addmm.default):
            return None
        flat = addmm.args[1]
        if not (isinstance(flat, fx.Node) and flat.target in _VIEWS and len(flat.users) == 1):
            return None
        if len(addmm.users) != 1 or not isinstance(flat.args[0], fx.Node):
            return None
        x, flat_out, out = (n.meta.get("val") for n in (flat.args[0], flat, node))
        if not all(isinstance(v, torch.Tensor) for v in (x, flat_out, out)):
            return None
        # shapes may be symbolic: compared as text, which needs no guard
        if flat_out.dim() != 2 or str(flat_out.shape[-1]) != str(x.shape[-1]):
            return None
        if str(out.shape[:-1]) != str(x.shape[:-1]):
            return None
        return addmm

    def projection_input(self, node: fx.Node) -> fx.Node:
        addmm = self._addmm(node)
        return addmm.args[1].args[0] if addmm is not None else node.args[0]

    def projection_steps(self, node: fx.Node) -> list[fx.Node]:
        """The nodes a projection node stands for besides itself (Conv1D's addmm, view)."""
        addmm = self._addmm(node)
        return [addmm, addmm.args[1]] if addmm is not None else []

    def projection_path(self, node: fx.Node) -> str:
        """Module path of a projection node: the module called, or the owner of the weight."""
        if node.op == "call_module":
            return node.target
        addmm = self._addmm(node)
        weight = addmm.args[2] if addmm is not None else node.args[1]
        return weight.target.rpartition(".")[0]

    def back(self, node):
        return skip_back(self.root, node)

    def activation_input(self, node) -> tuple[str, fx.Node, list[fx.Node]] | None:
        """(activation name, its input after pass-throughs, nodes passed) if `node` is one."""
        if not isinstance(node, fx.Node) or not node.args:
            return None
        name = activation_name(self.root, node)
        if name is None:
            return None
        source, passed = self.back(node.args[0])
        return name, source, [node, *passed]

    def chunk_half(self, node) -> tuple[fx.Node, int] | None:
        """(the chunked projection, item) if node is `proj(x).chunk(2, dim=-1)[item]`."""
        if not (isinstance(node, fx.Node) and node.op == "call_function"):
            return None
        if node.target is not operator.getitem:
            return None
        chunk, item = node.args
        if not isinstance(chunk, fx.Node) or chunk.target not in _CHUNKS:
            return None
        chunks = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
        dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
        value = chunk.meta.get("val")
        last = -1 if value is None else value[0].dim() - 1
        if chunks != 2 or dim not in (-1, last):
            return None
        return chunk, item

    def match(self, down: fx.Node) -> tuple[FFNMatch, str, str, int, int, int] | None:
        down_shape = self.projection(down)
        if down_shape is None or not down.args or down.meta.get(CONVERTED_MARK):
            return None
        hidden, passed = self.back(self.projection_input(down))
        interior = passed + self.projection_steps(down)
        act = self.activation_input(hidden)
        found = None
        if act is None and hidden.op in ("call_function", "call_method"):
            if hidden.target in MULTIPLY:
                found = self.gated(hidden, down_shape[0])
            if found is None:
                act = pointwise_chain(self.root, hidden, lambda n: self.projection(n) is not None)
        if act is not None:
            name, up, act_nodes = act
            up_shape = self.projection(up)
            if up_shape is None or up_shape[1] != down_shape[0]:
                return None
            entry, kind, linears = self.projection_input(up), "mlp", [up]
            interior += act_nodes + [up, *self.projection_steps(up)]
            d_model, d_hidden = up_shape
        elif found is not None:
            entry, kind, name, linears, nodes, d_model = found
            interior += [hidden, *nodes]
            d_hidden = down_shape[0]
        else:
            return None
        if not isinstance(entry, fx.Node):
            return None
        ffn_nodes = set(interior)
        for node in interior:
            if any(user not in ffn_nodes and user is not down for user in node.users):
                return None  # a hidden activation is used outside the FFN: not separable
        order = {n: i for i, n in enumerate(self.root.graph.nodes)}
        interior = sorted(ffn_nodes, key=order.__getitem__)  # each node once
        targets = tuple(self.projection_path(n) for n in (*linears, down))
        m = FFNMatch(entry=entry, exit=down, interior=tuple(interior), linears=targets)
        return m, kind, name, d_model, d_hidden, down_shape[1]

    def gated(self, mul: fx.Node, d_hidden: int):
        left, right = (self.back(a) for a in mul.args[:2])
        for (act_node, act_passed), (lin_node, lin_passed) in ((left, right), (right, left)):
            act = self.activation_input(act_node)
            if act is None:
                continue
            name, gate, act_nodes = act
            nodes = act_passed + lin_passed + act_nodes
            gate_shape, up_shape = self.projection(gate), self.projection(lin_node)
            if gate is lin_node and gate_shape and gate_shape[1] == d_hidden:
                # h * act(h) of one projection: an MLP (h * sigmoid(h) is SiLU), not gated
                name = "silu" if name == "sigmoid" else f"x*{name}"
                nodes += [gate, *self.projection_steps(gate)]
                return self.projection_input(gate), "mlp", name, [gate], nodes, gate_shape[0]
            entry = self.projection_input(gate) if gate_shape else None
            if gate_shape and up_shape and entry is self.projection_input(lin_node):
                if gate_shape[1] == up_shape[1] == d_hidden:
                    linears = [gate, lin_node]
                    nodes += [*linears, *self.projection_steps(gate)]
                    nodes += self.projection_steps(lin_node)
                    return entry, "gated", name, linears, nodes, gate_shape[0]
            halves = self.chunk_half(gate), self.chunk_half(lin_node)
            if None in halves or halves[0][0] is not halves[1][0]:
                continue
            chunk = halves[0][0]
            fused = chunk.args[0]
            fused_shape = self.projection(fused)
            if (
                fused_shape
                and fused_shape[1] == 2 * d_hidden
                and {halves[0][1], halves[1][1]} == {0, 1}
            ):
                nodes += [gate, lin_node, chunk, fused, *self.projection_steps(fused)]
                entry = self.projection_input(fused)
                return entry, "fused_gated", name, [fused], nodes, fused_shape[0]
        return None


def _module_path(capture: Capture, match: FFNMatch) -> str:
    if not capture.whole_model:
        return capture.path
    parents = [t.rsplit(".", 1)[0] if "." in t else "" for t in match.linears]
    common = parents[0].split(".")
    for parent in parents[1:]:
        parts = parent.split(".")
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


def _split_head(capture: Capture):
    """(act, d_model, d_hidden) if the module is `act(proj(x))`: the first half of a split FFN."""
    graph = capture.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    matcher = _Matcher(capture)
    result, _ = matcher.back(output.args[0])
    act = matcher.activation_input(result)
    if act is None or not placeholders:
        return None
    name, up, _ = act
    shape = matcher.projection(up)
    if shape is None or up.args[0] is not placeholders[0]:
        return None
    return name, shape[0], shape[1]


def _split_tail(capture: Capture, d_model: int, d_hidden: int) -> fx.Node | None:
    """The projection node fed by the module's first input, if it maps d_hidden -> d_model."""
    graph = capture.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    matcher = _Matcher(capture)
    for user in placeholders[0].users:
        if matcher.projection(user) == (d_hidden, d_model):
            return user
    return None


def _split_blocks(captures: list[Capture], taken: set[str]) -> list[tuple[str, FFNBlock]]:
    found = []
    for i, head in enumerate(captures):
        if head.whole_model or head.path in taken:
            continue
        spec = _split_head(head)
        if spec is None:
            continue
        name, d_model, d_hidden = spec
        parent = head.path.rpartition(".")[0]
        for tail in captures[i + 1 :]:
            if tail.path.rpartition(".")[0] != parent or tail.path in taken:
                continue
            down = _split_tail(tail, d_model, d_hidden)
            if down is None:
                continue
            exit_path = f"{tail.path}.{down.target}"
            block = FFNBlock(
                0, head.path, "split", d_model, d_hidden, name, d_model, exit_path, head
            )
            found.append((head.path, block))
            taken.update({head.path, tail.path})
            break
    return found


def block_indices(paths: list[str]) -> list[int | str]:
    """Block indices from module paths (DESIGN.md): `model.layers.12.mlp` -> 12; with several
    stacks, `encoder.block.2...` -> "encoder.2"; a path with no number is its own index, and
    FFNs in the root's own graph (path "": a flat nn.Sequential) count 0, 1, 2..."""
    parsed = []
    for path in paths:
        parts = path.split(".") if path else []
        pos = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        parsed.append((tuple(parts[:pos]), int(parts[pos])) if pos is not None else None)
    stacks = sorted({p[0] for p in parsed if p is not None})
    labels = {}
    if len(stacks) > 1:
        for stack in stacks:
            others = [s for s in stacks if s != stack]
            differs = (
                i
                for i, part in enumerate(stack)
                if any(len(o) <= i or o[i] != part for o in others)
            )
            pos = next(differs, len(stack) - 1)
            labels[stack] = stack[pos] if stack else "root"
    indices: list[int | str] = []
    root_blocks = 0
    for path, p in zip(paths, parsed):
        if not path:
            indices.append(root_blocks)
            root_blocks += 1
        elif p is None:
            indices.append(path)
        else:
            indices.append(f"{labels[p[0]]}.{p[1]}" if labels else p[1])
    seen: dict[str, int] = {}
    unique = []
    for index in indices:
        count = seen.get(str(index), 0)
        seen[str(index)] = count + 1
        unique.append(index if count == 0 else f"{index}.{count}")
    return unique


def find_ffn(state: TransformState) -> None:
    """Fill `state.blocks` with every FFN found in the captured graphs, in model order."""
    found: list[tuple[str, FFNBlock]] = []
    taken: set[str] = set()
    for capture in state.captures:
        matcher = _Matcher(capture)
        for node in capture.graph_module.graph.nodes:
            result = matcher.match(node)
            if result is None:
                continue
            match, kind, act, d_model, d_hidden, d_out = result
            path = _module_path(capture, match)
            block = FFNBlock(0, path, kind, d_model, d_hidden, act, d_out, "", capture, match)
            found.append((path, block))
            taken.add(capture.path)
    found += _split_blocks(state.captures, taken)
    # FFNs inside an MoE block (its experts, a shared expert) are not blocks of their own;
    # MoE blocks get indices beside the FFNs' so that select can name them when asked for.
    moe = find_moe_blocks(state.model)
    found = [(path, block) for path, block in found if not any(inside(path, o) for o in moe)]
    order = {path: i for i, (path, _) in enumerate(state.model.named_modules())}
    everything = sorted(
        found + [(path, None) for path in moe], key=lambda item: order.get(item[0], -1)
    )
    everything = _with_converted(everything, state.model)
    indices = block_indices([path for path, _ in everything])
    state.blocks = [
        replace(b, index=i, position=position)
        for position, ((_, b), i) in enumerate(zip(everything, indices))
        if isinstance(b, FFNBlock)
    ]
    state.moe_blocks = {str(i): path for (path, b), i in zip(everything, indices) if b is None}
    log.info("found %d FFN blocks and %d MoE blocks", len(state.blocks), len(moe))


_CONVERTED = "converted"
# Set on a model rebuilt from a checkpoint of format 1 with several steps, whose later steps
# numbered only the blocks left unconverted: such a model keeps numbering them so.
LEGACY_LABELS_ATTRIBUTE = "memcompile_legacy_labels"


def _with_converted(blocks: list[tuple[str, object]], model: torch.nn.Module) -> list:
    """`blocks` with the blocks converted earlier back in their places (`_CONVERTED`), so that
    labels that count blocks (root-graph ordinals, "N.1", the stacks' names) stay what they
    were when the model was first converted: "convert more layers later" names them so."""
    if getattr(model, LEGACY_LABELS_ATTRIBUTE, False):
        return blocks
    converted = sorted(
        {m.source_block for m in model.modules() if isinstance(m, MemoryLayer) and m.source_block}
    )
    blocks = list(blocks)
    for position, path in converted:
        blocks.insert(min(position, len(blocks)), (path, _CONVERTED))
    return blocks
