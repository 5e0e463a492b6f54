"""What the passes find and hand on: FFN blocks, their matched nodes, and the pass state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from ..runtime import MemoryConfig, MemoryPool


def inside(path: str, outer: str) -> bool:
    """True when the module at `path` is `outer` or one of its descendants."""
    return path == outer or path.startswith(f"{outer}.")


@dataclass(frozen=True)
class FFNMatch:
    """The FX nodes of one FFN inside a captured graph.

    `entry` is the FFN's input, `exit` the output projection's node, `interior` every node
    strictly between them (the projections, the activation, dropout); `linears` the
    projections' module targets in the order up/gate..., down.
    """

    entry: fx.Node
    exit: fx.Node
    interior: tuple[fx.Node, ...]
    linears: tuple[str, ...]


@dataclass
class Capture:
    """One traced module: `graph_module` is `module` traced with its children as leaves
    (`whole_model`: the model itself is the graph)."""

    path: str
    module: nn.Module
    graph_module: fx.GraphModule
    whole_model: bool = False


@dataclass(frozen=True)
class FFNBlock:
    """A feed-forward block found in a model.

    index: the block index (int, or "encoder.2" style for models with several stacks);
    path: module path of the FFN; kind: "mlp" | "gated" | "fused_gated" | "split";
    d_model/d_hidden: input and hidden widths; activation: the activation's name;
    position: its place among the model's blocks, those converted earlier included.
    """

    index: int | str
    path: str
    kind: str
    d_model: int
    d_hidden: int
    activation: str
    d_out: int = field(default=0, repr=False)
    exit_path: str = field(default="", repr=False)
    capture: Capture | None = field(default=None, repr=False, compare=False)
    match: FFNMatch | None = field(default=None, repr=False, compare=False)
    position: int = field(default=-1, repr=False, compare=False)

    @property
    def label(self) -> str:
        return str(self.index)


@dataclass
class ConvertedBlock:
    block: FFNBlock
    layer: nn.Module  # the MemoryLayer
    original: nn.Module  # a callable x -> FFN output, for verification
    replacement: nn.Module  # a callable x -> new block output
    ffn_params: int = 0


@dataclass
class TransformState:
    """What the pass manager threads through the passes."""

    model: nn.Module
    config: MemoryConfig | None = None
    layers: list[int | str] | None = None
    captures: list[Capture] = field(default_factory=list)
    blocks: list[FFNBlock] = field(default_factory=list)
    moe_blocks: dict[str, str] = field(default_factory=dict)  # index label -> path
    selected: list[FFNBlock] = field(default_factory=list)
    converted: list[ConvertedBlock] = field(default_factory=list)
    pool: MemoryPool | None = None
    lazy_values: bool = False  # value tables on the meta device, built later from their recipe
