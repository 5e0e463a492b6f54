"""rewrite: put a MemoryLayer in place of (replace) or beside (augment) each chosen FFN.

Three ways, by how the FFN sits in the model:
- the FFN is a whole module (`mlp`): swap the module for the layer, or for
  `AugmentedFFN(mlp, layer)`;
- the FFN is split over two sibling modules (BERT's intermediate/output): swap both;
- otherwise (the FFN shares its module with other code, or the model is one fx graph):
  rewrite the graph, and the module becomes that GraphModule.
"""

from __future__ import annotations

import logging
import operator

import torch.fx as fx
from torch import nn

from ..runtime import MemoryLayer
from ..runtime.init import derive_seed
from ..runtime.wrappers import CONVERTED_MARK, AugmentedFFN, SplitFFNEntry, SplitFFNExit
from .activations import skip_back
from .blocks import ConvertedBlock, FFNBlock, TransformState
from .capture import trace_module
from .share import check_shareable

log = logging.getLogger(__name__)


def _count(*modules: nn.Module) -> int:
    params = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(params.values())


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def _exit_projection(model: nn.Module, block: FFNBlock) -> nn.Module:
    if block.kind == "split":
        return model.get_submodule(block.exit_path)
    return block.capture.graph_module.get_submodule(block.match.exit.target)


def _is_whole_module(block: FFNBlock) -> bool:
    """True when the module's forward is exactly the FFN (plus trailing dropout)."""
    capture, match = block.capture, block.match
    if capture.whole_model or not block.path:
        return False
    graph = capture.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    result, trailing = skip_back(capture.graph_module, output.args[0])
    if result is not match.exit or match.entry is not placeholders[0]:
        return False
    if any(p.users for p in placeholders[1:]):
        return False
    # unused attribute reads, e.g. T5's `isinstance(self.wo.weight, torch.Tensor)` check
    dead = {n for n in graph.nodes if n.op == "get_attr" and not n.users}
    ffn = {*placeholders, *match.interior, match.exit, *trailing, output, *dead}
    return all(node in ffn for node in graph.nodes)


def _swap_module(model: nn.Module, block: FFNBlock, layer: MemoryLayer, augment: bool):
    ffn = block.capture.module
    new = AugmentedFFN(ffn, layer) if augment else layer
    _set_submodule(model, block.path, new)
    return ConvertedBlock(block, layer, ffn, new, _count(ffn))


def _swap_split(model: nn.Module, block: FFNBlock, layer: MemoryLayer, augment: bool):
    head = model.get_submodule(block.path)
    down = model.get_submodule(block.exit_path)
    if augment:
        new_head, new_down = SplitFFNEntry(head, layer), SplitFFNExit(down, block.d_hidden)
    else:
        new_head, new_down = layer, nn.Identity()
    _set_submodule(model, block.path, new_head)
    _set_submodule(model, block.exit_path, new_down)
    original, replacement = nn.Sequential(head, down), nn.Sequential(new_head, new_down)
    return ConvertedBlock(block, layer, original, replacement, _count(head, down))


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, n = base, 0
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        n += 1
        name = f"{base}_{n}"


def _follow_training(gm: fx.GraphModule, module: nn.Module, label: str) -> None:
    """Make the graph read its `training` flag where the module's forward reads `self.training`.

    Tracing bakes `self.training` in as a constant (`F.dropout(h, p, self.training)`), so
    the module is traced again in the other mode: every argument that flips with the mode
    becomes a read of `gm.training`, and train/eval keep working after the rewrite.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.train(not module.training)
    try:
        twin = trace_module(module)
    finally:
        for m, training in flags:
            m.training = training
    nodes, twins = list(gm.graph.nodes), list(twin.graph.nodes) if twin is not None else []
    if len(nodes) != len(twins) or any(
        (a.op, a.target) != (b.op, b.target) for a, b in zip(nodes, twins)
    ):
        log.warning(
            "block %s: the forward differs between train and eval mode; the rewritten block "
            "keeps the %s-mode code",
            label,
            "train" if module.training else "eval",
        )
        return

    def flips(value, twin_value) -> bool:
        return value is module.training and twin_value is (not module.training)

    flag = None
    for node, other in zip(nodes, twins):
        args = [i for i, (a, b) in enumerate(zip(node.args, other.args)) if flips(a, b)]
        kwargs = [k for k, v in node.kwargs.items() if flips(v, other.kwargs.get(k))]
        if (args or kwargs) and flag is None:
            with gm.graph.inserting_before(node):
                flag = gm.graph.create_node("get_attr", "training")
        for i in args:
            node.update_arg(i, flag)
        for key in kwargs:
            node.update_kwarg(key, flag)


def _carry_over(gm: fx.GraphModule, module: nn.Module) -> None:
    """Give `gm` the module's children, parameters and buffers that the traced forward did
    not use: a GraphModule keeps only what its graph reads, and the rest must not vanish
    from the model (its state_dict, its parameter count)."""
    for name, child in module.named_children():
        if getattr(gm, name, None) is not child:
            setattr(gm, name, child)
    for name, param in module.named_parameters(recurse=False):
        if name not in gm._parameters:
            gm.register_parameter(name, param)
    for name, buffer in module.named_buffers(recurse=False):
        persistent = name not in module._non_persistent_buffers_set
        gm.register_buffer(name, buffer, persistent=persistent)


def _rewrite_graph(model: nn.Module, block: FFNBlock, layer: MemoryLayer, augment: bool):
    gm, match = block.capture.graph_module, block.match
    graph = gm.graph
    if not block.capture.whole_model and not getattr(gm, CONVERTED_MARK, False):
        _follow_training(gm, block.capture.module, block.label)
        _carry_over(gm, block.capture.module)
    linears = [gm.get_submodule(t) for t in match.linears]
    name = _free_name(
        gm, f"{block.path}.memory" if block.capture.whole_model and block.path else "memory"
    )
    gm.add_submodule(name, layer)
    with graph.inserting_after(match.exit):
        memory = graph.call_module(name, (match.entry,))
    if augment:
        with graph.inserting_after(memory):
            total = graph.call_function(operator.add, (match.exit, memory))
        match.exit.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        match.exit.meta[CONVERTED_MARK] = True  # the FFN stays in the graph: not found again
    else:
        match.exit.replace_all_uses_with(memory)
        for node in reversed((*match.interior, match.exit)):
            graph.erase_node(node)
        for node in list(graph.nodes):
            if (
                node.op == "get_attr"
                and not node.users
                and node.target.startswith(tuple(f"{t}." for t in match.linears))
            ):
                graph.erase_node(node)  # e.g. T5's unused read of `self.wo.weight`
        still_used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
        for target in set(match.linears):
            if not any(used == target or used.startswith(f"{target}.") for used in still_used):
                gm.delete_submodule(target)
    gm.recompile()
    if not block.capture.whole_model:
        setattr(gm, CONVERTED_MARK, True)
        _set_submodule(model, block.path, gm)
        log.info("block %s rewritten as an FX graph module", block.label)
    return ConvertedBlock(block, layer, None, None, _count(*linears))


def rewrite(state: TransformState) -> None:
    """Build a MemoryLayer per selected block and put it into the model."""
    config, model = state.config, state.model
    augment = config.mode == "augment"
    positions = {block.path: i for i, block in enumerate(state.blocks)}
    # Resolve every config and check sharing first, so a bad request leaves the model as is.
    configs = [config.resolve(block.d_model, block.d_out) for block in state.selected]
    if config.share_values:
        check_shareable(model, {(c.n_keys**2, c.v_dim) for c in configs})
    for block, resolved in zip(state.selected, configs):
        weight = _exit_projection(model, block).weight
        layer = MemoryLayer(
            block.d_model,
            block.d_out,
            resolved,
            augment=augment,
            own_values=not resolved.share_values,
            seed=derive_seed(resolved.seed, positions[block.path]),
            dtype=resolved.torch_dtype or weight.dtype,
            device=weight.device,
        )
        if block.kind == "split":
            converted = _swap_split(model, block, layer, augment)
        elif _is_whole_module(block):
            converted = _swap_module(model, block, layer, augment)
        else:
            converted = _rewrite_graph(model, block, layer, augment)
        state.converted.append(converted)
