"""The memory-layer ops: `memcompile::pk_topk` and `memcompile::bag`."""

from .ops import bag, pk_topk

__all__ = ["bag", "pk_topk"]
