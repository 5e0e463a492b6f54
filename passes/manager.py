"""The pass manager: runs passes, each `f(state) -> None`, in order over one TransformState."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .blocks import TransformState
from .capture import capture
from .find_ffn import find_ffn
from .rewrite import rewrite
from .select import select
from .share import share
from .verify import verify

log = logging.getLogger(__name__)

Pass = Callable[[TransformState], None]

FIND_PASSES: tuple[Pass, ...] = (capture, find_ffn)
TRANSFORM_PASSES: tuple[Pass, ...] = (capture, find_ffn, select, rewrite, share, verify)


def run_passes(state: TransformState, passes: Sequence[Pass] = TRANSFORM_PASSES) -> TransformState:
    for p in passes:
        log.debug("pass %s", p.__name__)
        p(state)
    return state
