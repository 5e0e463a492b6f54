"""Build and load of memcompile's C++ CPU kernels.

One shared library holds the ONNX Runtime kernels of the "custom" ONNX form
(`ort_kernels.cc`, registered by `memcompile.runtime.ort_session`) and the CPU kernels of
torch's ops (`decode_kernels.cc` for inference, `training_kernels.cc` for the differentiable
ops; called by `cpu.py`), over the math in `cpu_kernels.h`.
It needs only a C++17 compiler with `_Float16` (GCC 12+, Clang 15+; the float16 kernels
use it): the ONNX Runtime part names the slots of the version-1
`OrtApi` table it uses (frozen by ONNX Runtime's ABI guarantee), so no headers.
It is compiled on first use (about six seconds on two cores) into a cache directory
($MEMCOMPILE_CACHE, else ~/.cache/memcompile) and reused; without a compiler, callers fall
back to PyTorch or to the nodes' ONNX function bodies.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("ort_kernels.cc", "decode_kernels.cc", "training_kernels.cc", "cpu_kernels.h")
)
_COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-fvisibility=hidden")
_LOADED: dict[Path, ctypes.CDLL] = {}
_FAILED: set[Path] = set()  # builds that failed in this process: said once, not retried
_BUILD_LOCK = threading.Lock()
_BUILD_TIMEOUT_S = 600
_WARNED_CXX: set[str] = set()


def cache_dir() -> Path:
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
    chosen = os.environ.get("CXX")
    if chosen and not shutil.which(chosen) and chosen not in _WARNED_CXX:
        _WARNED_CXX.add(chosen)
        log.warning(
            "CXX=%r is not a compiler on the PATH (a command with arguments is not taken): "
            "memcompile looks for c++, g++ or clang++ instead", chosen
        )  # fmt: skip
    for name in (chosen, "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, target: Path) -> None:
    """Compile the kernels into `target` (with OpenMP when the compiler has it), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sources = [source for source in SOURCES if source.suffix == ".cc"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        openmp_errors = _compile_and_link(compiler, sources, ["-fopenmp"], built)
        if openmp_errors:
            errors = _compile_and_link(compiler, sources, [], built)
            if errors:
                raise RuntimeError(f"building memcompile's C++ CPU kernels failed: {errors}")
            reason = openmp_errors.splitlines()[0]
            log.warning(
                "memcompile's C++ CPU kernels were built without OpenMP, so on one thread "
                "(-fopenmp failed: %s); delete %s to build them again", reason, target
            )  # fmt: skip
        os.replace(built, target)


def _compile_and_link(compiler: str, sources: list[Path], extra: list[str], built: Path) -> str:
    """The library at `built` from `sources`; the compiler's errors, or "" when it worked.
    The sources compile side by side: 6.2 s on two cores, where one after another took 9.4
    (the decode kernels alone take five)."""
    objects = [built.with_name(f"{source.stem}.o") for source in sources]
    compiles = [
        subprocess.Popen(
            [compiler, *_COMPILE_FLAGS, *extra, f"-I{SOURCES[0].parent}", "-c", str(source), "-o",
             str(obj)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for source, obj in zip(sources, objects)
    ]  # fmt: skip
    try:
        outcomes = [
            (process.communicate(timeout=_BUILD_TIMEOUT_S)[1], process.returncode)
            for process in compiles
        ]
    except subprocess.TimeoutExpired:
        for process in compiles:
            process.kill()
        return f"the compiler ran past {_BUILD_TIMEOUT_S} s"
    failed = [errors.strip() or "the compiler failed" for errors, code in outcomes if code]
    if failed:
        return failed[0]
    link = [compiler, "-shared", *extra, *map(str, objects), "-o", str(built)]
    try:
        result = subprocess.run(
            link, capture_output=True, text=True, check=False, timeout=_BUILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"the link ran past {_BUILD_TIMEOUT_S} s"
    return "" if result.returncode == 0 else result.stderr.strip() or "the link failed"


@functools.cache
def _library_name(compiler: str) -> str:
    """The library's file name, keyed by what built it: read once a process (the sources,
    the CPU's flags), not at every session or counter read."""
    sources = [source.read_text() for source in SOURCES]
    recipe = [*sources, compiler, *_COMPILE_FLAGS, platform.machine(), _cpu_flags()]
    return f"cpu-kernels-{hashlib.sha256(chr(0).join(recipe).encode()).hexdigest()[:16]}.so"


def native_library(build: bool = True) -> Path | None:
    """The path of the kernels' shared library, built (once) if `build`, and loaded.

    None when it is not built and cannot be: no C++ compiler, or the build failed (logged).
    """
    compiler = _compiler()
    if compiler is None:
        if build:
            log.warning("no C++ compiler (set CXX): memcompile's C++ CPU kernels are not built")
        return None
    target = cache_dir() / _library_name(compiler)
    with _BUILD_LOCK:
        if target in _FAILED:
            return None
        if not target.exists() and build:
            log.info("building memcompile's C++ CPU kernels into %s", target)
            try:
                _build(compiler, target)
            except RuntimeError as error:
                _FAILED.add(target)
                log.warning("%s; their ops run in PyTorch", error)
                return None
            except OSError as error:
                _FAILED.add(target)
                log.warning(
                    "memcompile's C++ CPU kernels cannot be built in %s (%s): point "
                    "MEMCOMPILE_CACHE at a writable folder; their ops run in PyTorch",
                    target.parent, error,
                )  # fmt: skip
                return None
        if not target.exists():
            return None
        if target not in _LOADED:
            try:
                # Held for the life of the process, so the library (and its call counters)
                # outlives the sessions and layers that use it.
                _LOADED[target] = ctypes.CDLL(str(target))
            except OSError as error:  # a noexec cache, a library from another toolchain
                log.warning("memcompile's C++ CPU kernels do not load from %s: %s", target, error)
                return None
    return target


def loaded(build: bool = True) -> ctypes.CDLL | None:
    """The loaded library (see `native_library`), or None."""
    path = native_library(build)
    return None if path is None else _LOADED[path]


def call_count(counter: str) -> int:
    """A counter of the library in this process: "kernel" (ONNX Runtime kernel calls),
    "lookup" (pk_lookup CPU kernel calls), "decode" (whole-layer calls, `cpu.decode`) or
    "training" (pk_topk and bag_backward CPU kernel calls); 0 when the library is not
    built."""
    library = loaded(build=False)
    if library is None:
        return 0
    calls = getattr(library, f"memcompile_{counter}_calls")
    calls.restype = ctypes.c_uint64
    return int(calls())


def set_ort_threads(threads: int) -> None:
    """The OpenMP threads of the ONNX Runtime kernels' calls in this process (at least one)."""
    library = loaded(build=False)
    if library is not None:
        library.memcompile_ort_threads(ctypes.c_int(max(1, int(threads))))


_OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def openmp_runtimes() -> set[str]:
    """The paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return set()
    paths = {line.split(maxsplit=5)[-1] for line in lines if "/" in line}
    return {path for path in paths if any(name in Path(path).name for name in _OPENMP_RUNTIMES)}


@functools.cache
def shares_torch_openmp() -> bool:
    """Whether the loaded library's OpenMP threads are torch's: one OpenMP runtime in the
    process (the library's `libgomp.so.1` resolved to the copy torch loaded). Then a kernel
    may run on torch.get_num_threads() threads. A second runtime would start a second pool,
    which fights torch's for the cores and hangs a forked child, so kernels stay on one
    thread (also where the maps cannot be read)."""
    return loaded() is not None and len(openmp_runtimes()) == 1
