"""The one error type memcompile raises for bad input, and the optional-dependency check."""

from __future__ import annotations

import importlib
from types import ModuleType


class MemcompileError(ValueError):
    """Bad input to memcompile: the message says what is wrong and how to fix it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency; its absence is a MemcompileError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MemcompileError(
            f"{purpose} needs {module.split('.')[0]} ({error}): pip install 'memcompile[{extra}]'"
        ) from None
