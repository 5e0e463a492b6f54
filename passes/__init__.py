"""The compiler passes: capture, find_ffn, select, rewrite, share, verify."""

if __name__ != "memcompile.passes":  # the repository root is on sys.path: see kernels/__init__.py
    raise ImportError(f"{__file__} is memcompile.passes: import memcompile, not passes")

from .blocks import FFNBlock, TransformState
from .capture import capture
from .find_ffn import find_ffn
from .manager import FIND_PASSES, TRANSFORM_PASSES, run_passes
from .rewrite import rewrite
from .select import select
from .share import share
from .verify import verify

__all__ = [
    "FFNBlock",
    "FIND_PASSES",
    "TRANSFORM_PASSES",
    "TransformState",
    "capture",
    "find_ffn",
    "rewrite",
    "run_passes",
    "select",
    "share",
    "verify",
]
