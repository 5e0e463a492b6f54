"""The one error type memcompile raises for bad input, the optional-dependency check, and
the integer test that input checks share."""

from __future__ import annotations

import importlib
import math
import numbers
from types import ModuleType


class MemcompileError(ValueError):
    """Bad input to memcompile: the message says what is wrong and how to fix it."""


def is_integer(value: object) -> bool:
    """An integer (numpy and torch integers too), and not a bool: `True` is no layer count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number, and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency; its absence is a MemcompileError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MemcompileError(
            f"{purpose} needs {module.split('.')[0]} ({error}): pip install 'memcompile[{extra}]'"
        ) from None
