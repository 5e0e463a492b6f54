"""ONNX Runtime sessions for exported memcompile models, with native kernels for the
`com.memcompile` nodes of the "custom" ONNX form.

The kernels (`PkTopK`, `Bag`) are memcompile's C++ CPU kernels (kernels/ort_kernels.cc, built
on first use by kernels/native.py): a custom-op library for ONNX Runtime's C API that needs
no ONNX Runtime headers. Without a compiler the session runs the nodes' ONNX function
bodies instead, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..kernels.native import cache_dir, call_count, native_library, set_ort_threads
from .errors import MemcompileError, require

if TYPE_CHECKING:  # an optional dependency (the [onnx] extra)
    import onnxruntime

log = logging.getLogger(__name__)

DOMAIN = "com.memcompile"  # passes/lower_onnx.py writes the nodes (runtime never imports passes)


def native_kernel_calls() -> int:
    """How many times the native PkTopK and Bag kernels have run in this process."""
    return call_count("kernel")


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
    options: onnxruntime.SessionOptions | None = None,
) -> onnxruntime.InferenceSession:
    """An `onnxruntime.InferenceSession` for an exported memcompile model.

    A model with `com.memcompile` nodes (the "custom" form) gets the native kernels
    registered: `native=None` uses them when they build and falls back to the nodes' ONNX
    functions otherwise; `native=True` requires them; `native=False` never uses them.
    `providers` defaults to the CPU provider; `options` is an `onnxruntime.SessionOptions`.
    The native kernels run on `options.intra_op_num_threads` OpenMP threads (one when it is
    0, ONNX Runtime's default; a setting for the process, the last session's)."""
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
        if library is not None:  # the kernels' threads: the session's intra-op count
            set_ort_threads(options.intra_op_num_threads)
        elif library is None and native:
            raise MemcompileError(
                f"the native com.memcompile kernels could not be built in {cache_dir()} (see "
                "the log): install a C++17 compiler, point MEMCOMPILE_CACHE at a writable "
                "folder, or pass native=False to run the ONNX function bodies"
            )
        elif library is None:
            log.warning("com.memcompile nodes run their ONNX function bodies (no native kernels)")
    return ort.InferenceSession(
        str(path), options, providers=list(providers or ["CPUExecutionProvider"])
    )
