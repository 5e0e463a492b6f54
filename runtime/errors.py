"""The one error type memcompile raises for bad input."""


class MemcompileError(ValueError):
    """Bad input to memcompile: the message says what is wrong and how to fix it."""
