"""The one error type memcompile raises for bad input, the optional-dependency check, and
what input checks and one-line messages share."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import numbers
from collections.abc import Iterable, Iterator
from types import ModuleType


class MemcompileError(ValueError):
    """Bad input to memcompile: the message says what is wrong and how to fix it."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message ("" for none): a one-line message quotes it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def quieted_loggers(names: Iterable[str], level: int = logging.ERROR) -> Iterator[None]:
    """These loggers at `level` or above for the block: third-party logs that repeat or bury
    the one-line error memcompile raises."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)


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
