"""ONNX Runtime sessions for exported memcompile models, with native kernels for the
`com.memcompile` nodes of the "custom" ONNX form.

The kernels (`PkTopK`, `Bag`) are the C++ below: a custom-op library for ONNX Runtime's C
API. It names only the slots of the API table it uses, from version 1 of `OrtApi` (frozen
by ONNX Runtime's ABI guarantee), so it builds with a C++17 compiler and no ONNX Runtime
headers. It is compiled on first use into a cache directory ($MEMCOMPILE_CACHE, else
~/.cache/memcompile) and reused. Without a compiler the session runs the nodes' ONNX
function bodies instead, with a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import MemcompileError, require

log = logging.getLogger(__name__)

DOMAIN = "com.memcompile"  # passes/lower_onnx.py writes the nodes (runtime never imports passes)
_LOADED: dict[Path, ctypes.CDLL] = {}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")

KERNELS_SOURCE = Path(__file__).with_name("ort_kernels.cc")  # compiled on first use


def _cache_dir() -> Path:
    if os.environ.get("MEMCOMPILE_CACHE"):
        return Path(os.environ["MEMCOMPILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memcompile"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared by machines never hands one
    a library built with -march=native for another."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, target: Path) -> None:
    """Compile the kernels into `target` (with OpenMP when the compiler has it), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "kernels.cc", Path(tmp) / target.name
        shutil.copyfile(KERNELS_SOURCE, source)
        errors = ""
        for extra in (("-fopenmp",), ()):
            command = [compiler, *_FLAGS, *extra, str(source), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                os.replace(built, target)
                return
            errors = result.stderr.strip()
        raise RuntimeError(f"building the memcompile ONNX Runtime kernels failed: {errors}")


def native_library(build: bool = True) -> Path | None:
    """The custom-op library of the `com.memcompile` kernels; built (once) if `build`.

    None when it is not built and cannot be: no C++ compiler, or the build failed (logged).
    """
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (set CXX): com.memcompile nodes run their ONNX functions")
        return None
    recipe = [KERNELS_SOURCE.read_text(), compiler, *_FLAGS, platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\0".join(recipe).encode()).hexdigest()[:16]
    target = _cache_dir() / f"ort-kernels-{key}.so"
    if not target.exists() and build:
        log.info("building the memcompile ONNX Runtime kernels into %s", target)
        try:
            _build(compiler, target)
        except (OSError, RuntimeError) as error:
            log.warning("%s; com.memcompile nodes run their ONNX functions", error)
            return None
    if not target.exists():
        return None
    # Held for the life of the process, so the library (and its call counter) outlives the
    # sessions that load it.
    _LOADED.setdefault(target, ctypes.CDLL(str(target)))
    return target


def native_kernel_calls() -> int:
    """How many times the native PkTopK and Bag kernels have run in this process."""
    library = native_library(build=False)
    if library is None:
        return 0
    calls = _LOADED[library].memcompile_kernel_calls
    calls.restype = ctypes.c_uint64
    return int(calls())


def _custom_domains(path: Path) -> bool:
    onnx = require("onnx", "onnx", "reading ONNX models")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's decode errors have no common base
        raise MemcompileError(f"{path} is not an ONNX model: {error}") from None
    return any(entry.domain == DOMAIN for entry in model.opset_import)


_LIBRARY_ENTRY = "memcompile.kernel_library"


def _has_library(options, library: Path) -> bool:
    """Whether `ort_session` registered `library` on these SessionOptions already."""
    try:
        return options.get_session_config_entry(_LIBRARY_ENTRY) == str(library)
    except RuntimeError:  # no such entry
        return False


def ort_session(
    path: str | os.PathLike,
    providers: Sequence[str] | None = None,
    *,
    native: bool | None = None,
    options=None,
):
    """An `onnxruntime.InferenceSession` for an exported memcompile model.

    A model with `com.memcompile` nodes (the "custom" form) gets the native kernels
    registered: `native=None` uses them when they build and falls back to the nodes' ONNX
    functions otherwise; `native=True` requires them; `native=False` never uses them.
    `providers` defaults to the CPU provider; `options` is an `onnxruntime.SessionOptions`.
    """
    ort = require("onnxruntime", "onnx", "running ONNX models")
    path = Path(path)
    if not path.is_file():
        raise MemcompileError(f"{path} is not an ONNX file")
    if isinstance(providers, str):
        raise MemcompileError(f"providers takes a list of provider names, e.g. [{providers!r}]")
    options = options if options is not None else ort.SessionOptions()
    if native is not False and _custom_domains(path):
        library = native_library()
        if library is not None and not _has_library(options, library):
            options.register_custom_ops_library(str(library))
            # ONNX Runtime refuses a second registration on the same options: remember it.
            options.add_session_config_entry(_LIBRARY_ENTRY, str(library))
        elif library is None and native:
            raise MemcompileError(
                f"the native com.memcompile kernels could not be built in {_cache_dir()} (see "
                "the log): install a C++17 compiler, point MEMCOMPILE_CACHE at a writable "
                "folder, or pass native=False to run the ONNX function bodies"
            )
    return ort.InferenceSession(
        str(path), options, providers=list(providers or ["CPUExecutionProvider"])
    )
