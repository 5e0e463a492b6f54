"""The public Python API: `find_ffn_blocks` and `transform`."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .passes import FIND_PASSES, FFNBlock, TransformState, run_passes
from .runtime import MemcompileError, MemoryConfig

log = logging.getLogger(__name__)

REPORT_ATTRIBUTE = "memcompile_report"
# The transforms applied so far, as {"layers": [...], "config": {...}}: what a checkpoint
# records so that loading can re-apply them.
RECIPE_ATTRIBUTE = "memcompile_recipe"


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class TransformReport:
    """What `transform` did: blocks found and converted, and the parameter counts."""

    blocks_found: tuple[FFNBlock, ...]
    converted: tuple[FFNBlock, ...]
    config: MemoryConfig
    params_before: int
    params_after: int
    ffn_params_removed: int
    memory_params_added: int

    def summary(self) -> str:
        converted = ", ".join(b.label for b in self.converted)
        return (
            f"{len(self.blocks_found)} FFN blocks found, {len(self.converted)} converted "
            f"({converted}) in {self.config.mode} mode; parameters "
            f"{self.params_before:,} -> {self.params_after:,}"
        )


def _described(block: FFNBlock) -> FFNBlock:
    """The block without its traced graph and module: a report kept on the model must not
    hold the FFN that replace mode removed (its weights would stay in memory)."""
    return replace(block, capture=None, match=None)


def find_ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """Every FFN block of `model`, in model order, with its index, path, kind and widths."""
    if not isinstance(model, nn.Module):
        raise MemcompileError(
            f"find_ffn_blocks needs a torch.nn.Module, got {type(model).__name__}"
        )
    return run_passes(TransformState(model), FIND_PASSES).blocks


def graph_memory_lookups(model: nn.Module) -> int:
    """How many memory lookups the graphs of `model` call (a converted torch.export
    program's module holds them as memcompile ops, not as MemoryLayer modules)."""
    from torch import fx

    graphs = [m.graph for m in model.modules() if isinstance(m, fx.GraphModule)]
    return sum(
        getattr(node.target, "namespace", None) == "memcompile"
        and node.target.__name__.split(".")[0] in ("pk_topk", "pk_lookup")
        for graph in graphs
        for node in graph.nodes
        if node.op == "call_function"
    )


def transform(
    model: nn.Module,
    layers: Sequence[int | str] | None = None,
    mem_size: int | str | None = None,
    *,
    config: MemoryConfig | None = None,
    lazy_init: bool = False,
    return_report: bool = False,
    **options,
) -> nn.Module | tuple[nn.Module, TransformReport]:
    """Convert the FFN blocks `layers` of `model` into product-key memory layers, in place.

    `layers` are block indices (`model.layers.12.mlp` is 12; "encoder.2" for models with
    several stacks); None converts every FFN. `mem_size` (default "1M") and `options` are
    `MemoryConfig` fields (heads, knn, k_dim, v_dim, gating, qk_norm, share_values, mode,
    seed, dtype), or pass a whole `config` (options then override its fields). With
    `lazy_init=True` the value tables stay on the meta device (no memory, no init time)
    until `memcompile.runtime.materialize_values(model)` builds them from their seed, or a
    checkpoint stores their recipe.

    Returns the same model object, with a `TransformReport` attached as
    `model.memcompile_report`; `return_report=True` returns `(model, report)` instead.
    """
    if isinstance(model, torch.export.ExportedProgram):
        raise MemcompileError(
            "transform needs a torch.nn.Module, got an ExportedProgram: pass program.module() "
            "(and torch.export.export the result again for a program)"
        )
    if not isinstance(model, nn.Module):
        raise MemcompileError(f"transform needs a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, MemoryConfig):
        raise MemcompileError(f"config takes a MemoryConfig, got {type(config).__name__}")
    if config is not None and mem_size is not None:
        raise MemcompileError("give mem_size inside config, or drop config: not both")
    try:
        if config is None:
            config = MemoryConfig(mem_size="1M" if mem_size is None else mem_size, **options)
        elif options:
            config = replace(config, **options)
    except TypeError as error:
        raise MemcompileError(f"{error}: see MemoryConfig for the options") from None
    if isinstance(layers, str) and "," in layers:  # the CLI's spelling, not a label
        raise MemcompileError(f"layers takes a list, e.g. layers=[1, 2], not the string {layers!r}")
    if isinstance(layers, (numbers.Integral, str)):
        layers = [layers]
    if layers is not None:  # numpy arrays and tensors of indices too
        try:
            listed = layers.tolist() if hasattr(layers, "tolist") else list(layers)
        except TypeError:  # a float, None-like object: no sequence of blocks
            raise MemcompileError(
                f"layers takes block indices or labels like 'encoder.2', got {layers!r}"
            ) from None
        listed = listed if isinstance(listed, list) else [listed]  # a 0-d array or tensor
        if any(isinstance(x, bool) for x in listed):
            raise MemcompileError(
                f"layers takes block indices or labels like 'encoder.2', got {listed!r}"
            )
        layers = [int(x) if isinstance(x, numbers.Integral) else x for x in listed]
    if graph_memory_lookups(model):
        raise MemcompileError(
            "the graph already holds memory lookups (memcompile:: ops) and cannot be converted "
            "again: convert the original program with all the layers at once"
        )
    converted = {str(i) for step in getattr(model, RECIPE_ATTRIBUTE, []) for i in step["layers"]}
    again = [str(layer) for layer in layers or () if str(layer) in converted]
    if again:
        raise MemcompileError(
            f"layer {again[0]} is already a memory layer (converted earlier): choose other layers"
        )
    params_before = count_parameters(model)
    state = TransformState(model, config, layers)
    state.lazy_values = lazy_init
    # New modules draw their throwaway default init from torch's global generators: the
    # user's seeded data order and dropout must not depend on whether a model was converted.
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        run_passes(state)
    params_after = count_parameters(model)
    removed = sum(c.ffn_params for c in state.converted) if config.mode == "replace" else 0
    report = TransformReport(
        blocks_found=tuple(map(_described, state.blocks)),
        converted=tuple(_described(c.block) for c in state.converted),
        config=config,
        params_before=params_before,
        params_after=params_after,
        ffn_params_removed=removed,
        memory_params_added=params_after - params_before + removed,
    )
    setattr(model, REPORT_ATTRIBUTE, report)
    recipe = [
        *getattr(model, RECIPE_ATTRIBUTE, []),
        {
            "layers": [b.index for b in report.converted],
            "config": config.to_dict(),
        },
    ]
    setattr(model, RECIPE_ATTRIBUTE, recipe)
    log.info("%s", report.summary())
    return (model, report) if return_report else model
