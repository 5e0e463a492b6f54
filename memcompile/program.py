"""torch.export programs (`.pt2`): converted at graph level and written back as `.pt2`.

The program's module (`ExportedProgram.module()`) is one FX graph of ATen ops; the passes
match FFNs on it (projections are `aten.linear` on parameters, the block path comes from
the parameters' owners), rewrite it, and the result is exported again with the program's
example inputs and its dynamic dimensions.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import json
import logging
import os
import pickle
import re
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .runtime import MemcompileError
from .runtime.outputs import atomic_file, deferred_write_errors

log = logging.getLogger(__name__)


# torch.load's environment overrides of its `weights_only` argument
_WEIGHTS_ONLY_SWITCHES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


class _PickleRefused(pickle.UnpicklingError):
    pass


_LOADING = threading.Lock()  # one guarded load at a time: each restores what it changed
_REFUSING = threading.local()


def _loads_but_on_a_loading_thread(*args, **kwargs):
    if getattr(_REFUSING, "active", False):
        raise _PickleRefused("a pickled payload")
    return _PICKLE_LOADS(*args, **kwargs)


_PICKLE_LOADS = pickle.loads


@contextlib.contextmanager
def _unpickling_refused():
    """torch.export.load unpickles what an archive marks as pickled (tensor subclasses,
    opaque constants) with torch.load's full unpickler or `pickle.loads`: a crafted .pt2
    runs code as it loads. Inside this block pickle.loads raises on this thread (other
    threads unpickle as before), and torch.load keeps to weights only
    (TORCH_FORCE_WEIGHTS_ONLY_LOAD: an environment switch, so process-wide while the block
    runs, which is one load). (TorchScript custom objects go through torch's own
    unpickler, which builds only registered classes.)"""
    with _LOADING:
        saved = {k: os.environ.get(k) for k in _WEIGHTS_ONLY_SWITCHES}
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        loads, pickle.loads = pickle.loads, _loads_but_on_a_loading_thread
        _REFUSING.active = True
        try:
            yield
        finally:
            _REFUSING.active = False
            pickle.loads = loads
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _unpickling_in(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, pickle.UnpicklingError):
            return True
        error = error.__cause__ or error.__context__
    return False


class _KeptLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))  # with the traceback it carries


@contextlib.contextmanager
def _kept_log(name: str) -> Iterator[list[str]]:
    """The logger's warnings in a list, kept from the console: torch.export.load logs a
    traceback before it raises, and only the log says why."""
    logger, kept = logging.getLogger(name), _KeptLog()
    level, propagate, handlers = logger.level, logger.propagate, logger.handlers
    logger.handlers = [kept]  # torch's logging gives torch.export a console handler of its own
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield kept.messages
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate


# transformers registers its output classes (ModelOutput) with torch's pytree as it defines
# them: a program exported from an HF model as it is returns one, and loads only after.
_UNREGISTERED = re.compile(
    r"Deserializing (transformers(?:\.\w+)+)\.\w+ in pytree is not registered"
)


def _import_output_types(messages: list[str]) -> bool:
    """Import the transformers modules whose output types the log says are missing; only
    transformers' own modules, whatever else an archive names. True if one was imported."""
    imported = False
    for module in {m for text in messages for m in _UNREGISTERED.findall(text)}:
        if module not in sys.modules:
            try:
                importlib.import_module(module)
            except ImportError:  # no transformers, or not this module (another version):
                continue  # the load's own error stands
            imported = True
    return imported


def _reason(messages: list[str], error: BaseException) -> str:
    """The error's text, unless it only points at the log ("check the warnings above",
    which memcompile keeps from the console): then the first sentence of the log's last
    exception line."""
    if "warnings above" not in str(error):
        return str(error)
    lines = [line for text in messages for line in text.splitlines()]
    said = [
        line.split("] ")[-1].strip()
        for line in lines
        if re.search(r"\w+(Error|Exception): ", line)
    ]
    if not said:
        return str(error)
    text = re.sub(r"^[\w.]+(Error|Exception): ", "", said[-1])
    return text.split(". ")[0].rstrip(".")  # torch's advice after the first sentence is not ours


# What torch.export.load runs besides unpickling: a shared library an archive carries
# (AOTInductor: dlopen runs its constructors), and each symbolic shape's `expr_str`, which it
# parses with sympy.sympify (Python's eval). Without trust an archive may hold neither code
# nor an expression beyond arithmetic on shape symbols.
_TRUST = (
    "memcompile refuses it by default; pass trust_pickle=True (--trust-pickle) only for files "
    "you made or trust"
)
_COMPILED_CODE = re.compile(r"(^|/)aotinductor/|\.(so|dll|dylib|pyd)$", re.IGNORECASE)
# The names sympy's srepr writes for shape arithmetic (Symbol('s0', positive=True),
# Mul(Integer(4), ...)) and the functions torch's deserializer gives sympify.
_SHAPE_NAMES = frozenset(
    "FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv LShift "
    "RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity Symbol Integer Rational "
    "Float Add Mul Pow Max Min Abs floor ceiling sqrt Eq Ne Lt Le Gt Ge StrictLessThan "
    "LessThan StrictGreaterThan GreaterThan Equality Unequality And Or Not Piecewise "
    "ExprCondPair Tuple oo zoo nan int_oo true false True False".split()
)
_SHAPE_SYMBOL = re.compile(r"[a-z]+\d+$")  # s0, s77, u0, zuf0: torch's symbol names
_SHAPE_KEYWORDS = frozenset({"positive", "negative", "integer", "nonnegative", "real",
                             "finite", "precision", "evaluate"})  # fmt: skip
_SHAPE_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword,
                ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop,
                ast.cmpop, ast.boolop)  # fmt: skip


def _plain_shape_expression(text: str) -> bool:
    """Whether `text` is arithmetic on shape symbols: calls of the names above, symbols,
    numbers and strings, operators; no attribute, subscript, lambda or other name."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _SHAPE_NODES):
            return False
        if isinstance(node, ast.Name) and not (
            node.id in _SHAPE_NAMES or _SHAPE_SYMBOL.match(node.id)
        ):
            return False
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return False
        if isinstance(node, ast.keyword) and node.arg not in _SHAPE_KEYWORDS:
            return False
    return True


def _expression_strings(document) -> Iterator[str]:
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr_str" and isinstance(value, str):
                    yield value
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def _refuse_code(path: str | os.PathLike) -> None:
    """MemcompileError if the archive holds code torch.export.load would run (see above)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return  # not an archive: torch.export.load says so
    with archive:
        names = archive.namelist()
        compiled = next((name for name in names if _COMPILED_CODE.search(name)), None)
        if compiled is not None:
            raise MemcompileError(
                f"{path} holds compiled code ({compiled}) that loading would run: {_TRUST}"
            )
        for name in (n for n in names if n.endswith(".json")):
            try:
                document = json.loads(archive.read(name))
            except (ValueError, RecursionError):
                continue  # torch.export.load says what is wrong with it
            for expression in _expression_strings(document):
                if not _plain_shape_expression(expression):
                    raise MemcompileError(
                        f"{path} holds a shape expression that is not arithmetic on shape "
                        f"symbols ({expression[:60]!r}), which loading would run as Python: "
                        f"{_TRUST}"
                    )


def load_program(
    path: str | os.PathLike, trust_pickle: bool = False
) -> torch.export.ExportedProgram:
    """The program in a .pt2 archive. One whose payloads are pickled, or that holds other
    code loading would run (a compiled library, a shape expression beyond arithmetic), is
    refused unless `trust_pickle`: they run whatever code they contain."""
    if not trust_pickle:
        _refuse_code(path)
    for attempt in range(2):
        guard = contextlib.nullcontext() if trust_pickle else _unpickling_refused()
        try:
            with guard, _kept_log("torch.export") as messages:
                return torch.export.load(path)
        except Exception as error:  # noqa: BLE001 - any unreadable archive is bad input
            if attempt == 0 and _import_output_types(messages):
                continue
            if not trust_pickle and _unpickling_in(error):
                raise MemcompileError(
                    f"{path} holds pickled payloads, which loading would unpickle, running "
                    f"whatever code they contain: {_TRUST}"
                ) from None
            raise MemcompileError(
                f"{path} is not a torch.export program (.pt2): {_reason(messages, error)}"
            ) from None
    raise AssertionError("unreachable")


def _dynamic_shapes(program: torch.export.ExportedProgram, module: torch.nn.Module):
    """The program's dynamic dimensions, as `dynamic_shapes` for re-exporting it as
    `module`: by argument name, so that keyword inputs keep theirs too. None where an input
    is not a plain tensor (a nested one), whose spec this does not build."""
    args, kwargs = program.example_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        shape = getattr(value, "shape", ())
        specs.append(
            {
                d: torch.export.Dim.AUTO
                for d, size in enumerate(shape)
                if isinstance(size, torch.SymInt)
            }
            or None
        )
    inputs = [*args, *kwargs.values()]
    if len(specs) != len(inputs) or not all(isinstance(t, torch.Tensor) for t in inputs):
        return None
    positional = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < len(args):
        return None
    return dict(zip([*positional[: len(args)], *kwargs], specs))


def reexport(program: torch.export.ExportedProgram, module: torch.nn.Module):
    """Export `module` (the converted program module) with `program`'s inputs and dims."""
    args, kwargs = program.example_inputs
    dynamic = _dynamic_shapes(program, module)
    return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)


def save_program(
    program: torch.export.ExportedProgram, path: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write a `.pt2` atomically: a temporary file beside `path`, renamed into place."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise MemcompileError(f"{path}: a torch.export program is written as a .pt2 file")
    # torch's zip writer aborts the process when a write fails under it (a full disk):
    # handed a file that holds the error back, it finishes and the error is raised here.
    with atomic_file(path, force=force) as tmp, deferred_write_errors(tmp) as file:
        torch.export.save(program, file)
    return path
