"""rewrite: put a MemoryLayer in place of (replace) or beside (augment) each chosen FFN.

Four ways, by how the FFN sits in the model, tried in this order:
- "module": the FFN is a whole module (`mlp`): swap it for the layer, or for
  `AugmentedFFN(mlp, layer)`;
- "split": the FFN is split over two sibling modules (BERT's intermediate/output): swap both;
- "children": the FFN is up -> act -> down child modules inside a bigger forward (OPT's
  decoder layer): swap the three children, the forward itself stays as written;
- "graph": otherwise (or when the model is one fx graph) rewrite the traced graph, and the
  module becomes that GraphModule. A graph traced with fixed arguments (defaults, **kwargs)
  is right for default calls only, so such a block is refused.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import zlib

import torch.fx as fx
from torch import nn

from ..runtime import MemcompileError, MemoryLayer
from ..runtime.init import derive_seed
from ..runtime.modes import training_mode
from ..runtime.wrappers import (
    CONVERTED_MARK,
    AugmentedFFN,
    PackedActivation,
    SplitFFNEntry,
    SplitFFNExit,
)
from .activations import is_pass_through, skip_back
from .blocks import ConvertedBlock, FFNBlock, TransformState, inside
from .capture import ASSUMED_DTYPE, is_specialized, trace_module
from .share import check_shareable

log = logging.getLogger(__name__)


def _count(*modules: nn.Module, extra: tuple[nn.Parameter, ...] = ()) -> int:
    """Parameters of `modules` and `extra`, each tied or shared one counted once."""
    params = {id(p): p.numel() for m in modules for p in m.parameters()}
    params.update((id(p), p.numel()) for p in extra)
    return sum(params.values())


def ffn_parameters(model: nn.Module, block: FFNBlock) -> int:
    """The FFN's own parameters: its module's when the module is the FFN, and a split FFN's
    two modules; else those its matched nodes use, as for an FFN written inline in a bigger
    layer (BART's fc1 and fc2) or one in a whole-model graph (a program: its module path is
    the enclosing layer), whose module's are the fallback where no node names a weight."""
    capture = block.capture
    if block.kind != "split" and not _is_whole_module(block):
        gm, match = capture.graph_module, block.match
        nodes = [*match.interior, match.exit]
        modules = [gm.get_submodule(n.target) for n in nodes if n.op == "call_module"]
        weights = []  # those the forward reads itself (F.linear; a program's aten.linear)
        for node in {*nodes, *(arg for n in nodes for arg in n.all_input_nodes)}:
            if node.op == "get_attr":
                with contextlib.suppress(AttributeError):  # a buffer or a constant
                    weights.append(gm.get_parameter(node.target))
        counted = _count(*modules, extra=tuple(weights))
        if counted or not capture.whole_model:
            return counted
    paths = [block.path, block.exit_path] if block.exit_path else [block.path]
    return _count(*(model.get_submodule(path) for path in paths))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    _replace_child(model.get_submodule(parent_path), name, module)


def _replace_child(parent: nn.Module, name: str, module: nn.Module) -> None:
    """parent.name = module, in the train/eval mode of the module it replaces (a model in
    eval() stays in eval())."""
    replaced = getattr(parent, name, None)
    if isinstance(replaced, nn.Module):
        module.train(replaced.training)
    setattr(parent, name, module)


def _exit_projection(model: nn.Module, block: FFNBlock) -> nn.Module:
    if block.kind == "split":
        return model.get_submodule(block.exit_path)
    return block.capture.graph_module.get_submodule(block.match.linears[-1])


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


def _swappable_children(block: FFNBlock) -> tuple[str, str, str] | None:
    """(up, act, down) child names when the FFN is three call_module nodes of direct
    children, each called once, with only pass-through nodes between them."""
    if block.kind != "mlp" or block.capture.whole_model:
        return None
    gm, match = block.capture.graph_module, block.match
    calls = [n for n in match.interior if n.op == "call_module"]
    others = [n for n in match.interior if n.op != "call_module"]
    if any(not is_pass_through(gm, n) for n in others):
        return None
    named = [n for n in calls if not is_pass_through(gm, n)]
    if len(named) != 2 or any("." in n.target for n in (*named, match.exit)):
        return None
    up, act = sorted(named, key=lambda n: n.target != match.linears[0])
    targets = (up.target, act.target, match.exit.target)
    counts = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    if any(counts.count(target) != 1 for target in targets):
        return None
    reads = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    if any(read.startswith(f"{target}.") for read in reads for target in targets):
        return None  # the forward reads e.g. `self.fc2.weight`: the children must stay
    return targets


def _swap_children(model: nn.Module, block: FFNBlock, layer: MemoryLayer, augment: bool):
    up_name, act_name, down_name = _swappable_children(block)
    parent = block.capture.module
    up, act, down = (getattr(parent, name) for name in (up_name, act_name, down_name))
    if augment:
        new = SplitFFNEntry(up, layer), PackedActivation(act, block.d_hidden)
        new += (SplitFFNExit(down, block.d_hidden),)
    else:
        new = layer, nn.Identity(), nn.Identity()
    for name, module in zip((up_name, act_name, down_name), new):
        _replace_child(parent, name, module)
    original, replacement = nn.Sequential(up, act, down), nn.Sequential(*new)
    return ConvertedBlock(block, layer, original, replacement, _count(up, act, down))


def _strategy(block: FFNBlock) -> str:
    if block.kind == "split":
        return "split"
    if _is_whole_module(block):
        return "module"
    if _swappable_children(block) is not None:
        return "children"
    other_code = None
    if getattr(block.capture.graph_module, ASSUMED_DTYPE, None) is not None:
        other_code = "code that branches on the input's dtype"
    elif not block.capture.whole_model and is_specialized(block.capture.module):
        other_code = "other code that takes optional arguments"
    if other_code is not None:
        raise MemcompileError(
            f"block {block.label} ({block.path}): its FFN shares "
            f"{type(block.capture.module).__name__}.forward with {other_code}, which a "
            "rewritten graph could not keep; this layout is not supported yet, choose other "
            "layers"
        )
    return "graph"


def block_seed(seed: int, block: FFNBlock) -> int:
    """A layer's seed: from the config seed and the block's path, so a block gets the same
    memory whether it is converted alone, with others, or in a later transform."""
    return derive_seed(seed, zlib.crc32(block.path.encode()))


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
    with training_mode(module, training=not module.training):
        twin = trace_module(module)
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


# On a rewritten block's exit node: the node that now gives the block's output. A block
# whose input was that exit (FFNs back to back in one graph) reads it from there.
_OUTPUT_NOW = "memcompile_output_now"


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
    entry = match.entry
    while _OUTPUT_NOW in entry.meta:  # the exit of a block rewritten before, just above
        entry = entry.meta[_OUTPUT_NOW]
    with graph.inserting_after(match.exit):
        memory = graph.call_module(name, (entry,))
    if augment:
        with graph.inserting_after(memory):
            total = graph.call_function(operator.add, (match.exit, memory))
        match.exit.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        match.exit.meta[CONVERTED_MARK] = True  # the FFN stays in the graph: not found again
        match.exit.meta[_OUTPUT_NOW] = total
    else:
        match.exit.replace_all_uses_with(memory)
        match.exit.meta[_OUTPUT_NOW] = memory
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
            if not any(inside(used, target) for used in still_used):
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
    # Resolve every config, choose every strategy and check sharing first, so a bad request
    # leaves the model as it was.
    configs = [config.resolve(block.d_model, block.d_out) for block in state.selected]
    strategies = [_strategy(block) for block in state.selected]
    if config.share_values:
        check_shareable(model, {(c.n_keys**2, c.v_dim) for c in configs}, config.torch_dtype)
    swap = {
        "split": _swap_split,
        "module": _swap_module,
        "children": _swap_children,
        "graph": _rewrite_graph,
    }
    for block, resolved, strategy in zip(state.selected, configs, strategies):
        weight = _exit_projection(model, block).weight
        layer = MemoryLayer(
            block.d_model,
            block.d_out,
            resolved,
            augment=augment,
            own_values=not resolved.share_values,
            lazy_values=state.lazy_values,
            seed=block_seed(resolved.seed, block),
            dtype=resolved.torch_dtype or weight.dtype,
            device=weight.device,
        )
        layer.source_block = (block.position, block.path)  # keeps later labels (find_ffn)
        log.debug("block %s: %s rewrite", block.label, strategy)
        state.converted.append(swap[strategy](model, block, layer, augment))
