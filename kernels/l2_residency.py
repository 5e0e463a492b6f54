"""Keep a gathered tensor's lines in a GPU's L2 while the kernels that gather it run.

The row pass (triton_rows.py) gathers each output-gradient row about 128 times at the
1.3B-like config (a column block of them is 33 MB, in a 50 MB L2), while 4 GB of value rows
and gradient rows stream through L2 once each. Counting its bytes, the short-row kernel's
5.5 ms in run 5 fits the gathers mostly missing L2 (GPU_NOTES.md). Eviction hints on the
loads would say which lines to keep, but Triton 3.6 drops them from the asynchronous copies
its pipeliner makes. CUDA's access policy window works on any load: a stream attribute
naming an address range, a share of whose lines persist in a set-aside part of L2 that
other accesses cannot evict (CUDA Programming Guide, "L2 cache set-aside for persisting
accesses"). Set through the driver API (libcuda), which torch does not expose.

`persisting(tensor, active_bytes)` sets the window on the current stream for the kernels
launched inside it. The first use sets this process's context's set-aside to the GPU's
maximum (it stays: accesses that do not persist use the set-aside while it holds no
persisting lines). Lines left persisting by the last window are reset to normal when the
next window is set (the reset is not ordered with the stream: a kernel still running then
loses the priority early, which costs time, never correctness). Nothing happens on other
devices, under CUDA-graph capture (context calls are not capturable) or where the driver
refuses (logged once, then off for the process).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

# cuda.h (CUDA 11.0 and later)
_CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
_CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE = 109
_CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
_CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1
_CU_ACCESS_PROPERTY_NORMAL = 0
_CU_ACCESS_PROPERTY_PERSISTING = 2


class AccessPolicyWindow(ctypes.Structure):
    """cuda.h's CUaccessPolicyWindow."""

    _fields_ = [
        ("base_ptr", ctypes.c_void_p),
        ("num_bytes", ctypes.c_size_t),
        ("hitRatio", ctypes.c_float),
        ("hitProp", ctypes.c_int),
        ("missProp", ctypes.c_int),
    ]


class StreamAttrValue(ctypes.Union):
    """cuda.h's CUstreamAttrValue (CUlaunchAttributeValue): 64 bytes."""

    _fields_ = [("pad", ctypes.c_char * 64), ("accessPolicyWindow", AccessPolicyWindow)]


def _check(driver: ctypes.CDLL, call: str, *args) -> None:
    result = getattr(driver, call)(*args)
    if result != 0:
        raise OSError(f"{call} returned CUresult {result}")


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def _set_aside(index: int) -> tuple[int, int]:
    """(set-aside bytes, largest window) of CUDA device `index`; sets its context's
    set-aside to the device's maximum on first call. Zeros where it has none."""
    driver, device, value = _driver(), ctypes.c_int(), ctypes.c_int()
    _check(driver, "cuDeviceGet", ctypes.byref(device), index)
    _check(driver, "cuDeviceGetAttribute", ctypes.byref(value),
           _CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE, device)  # fmt: skip
    most = value.value
    _check(driver, "cuDeviceGetAttribute", ctypes.byref(value),
           _CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE, device)  # fmt: skip
    if most > 0:
        with torch.cuda.device(index):  # the limit is the current context's
            torch.cuda.init()
            _check(driver, "cuCtxSetLimit", _CU_LIMIT_PERSISTING_L2_CACHE_SIZE,
                   ctypes.c_size_t(most))  # fmt: skip
        log.info("L2 set-aside for persisting lines on cuda:%d: %d bytes", index, most)
    return most, value.value


def window(base: int, n_bytes: int, set_aside: int, active_bytes: int) -> AccessPolicyWindow:
    """The policy for `n_bytes` at address `base` of which `active_bytes` are gathered at a
    time: the share of lines that the set-aside holds persists, the rest stays normal."""
    share = min(1.0, set_aside / max(active_bytes, 1))
    return AccessPolicyWindow(base, n_bytes, share, _CU_ACCESS_PROPERTY_PERSISTING,
                              _CU_ACCESS_PROPERTY_NORMAL)  # fmt: skip


def _set_window(stream: int, policy: AccessPolicyWindow) -> None:
    value = StreamAttrValue()
    value.accessPolicyWindow = policy
    _check(_driver(), "cuStreamSetAttribute", ctypes.c_void_p(stream),
           _CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW, ctypes.byref(value))  # fmt: skip


def status() -> str:
    """'on', 'off: <why>' after a refusal, or 'unused' before any window was asked for."""
    return _status


_status = "unused"


@contextmanager
def persisting(tensor: torch.Tensor, active_bytes: int | None = None) -> Iterator[bool]:
    """Within: kernels launched on the current stream keep a share of `tensor`'s lines in
    L2 (sized to the set-aside against `active_bytes`, the bytes gathered at a time:
    all of them by default). Yields whether a window was set."""
    usable = (
        _status in ("unused", "on")
        and tensor.device.type == "cuda"
        and torch.version.hip is None
        and tensor.numel() > 0
        and not torch.cuda.is_current_stream_capturing()
    )
    stream = _open_window(tensor, active_bytes) if usable else None
    try:
        yield stream is not None
    finally:
        if stream is not None:
            with torch.cuda.device(tensor.device):
                _try(_set_window, stream, AccessPolicyWindow(None, 0, 0.0, 0, 0))  # off


def _open_window(tensor: torch.Tensor, active_bytes: int | None) -> int | None:
    """The current stream's handle after setting its window on `tensor`, or None."""
    with torch.cuda.device(tensor.device):  # the context calls act on the current device's
        limits = _try(_set_aside, torch.cuda.current_device())
        if limits is None:
            return None
        set_aside, largest = limits
        if set_aside <= 0:
            _refuse("this GPU has no L2 set-aside for persisting lines")
            return None
        n_bytes = min(tensor.numel() * tensor.element_size(), largest)
        active = n_bytes if active_bytes is None else min(active_bytes, n_bytes)
        stream = torch.cuda.current_stream().cuda_stream
        policy = window(tensor.data_ptr(), n_bytes, set_aside, active)
        # The last window's lines go back to normal first.
        if _try(_check, _driver(), "cuCtxResetPersistingL2Cache") is None:
            return None
        return stream if _try(_set_window, stream, policy) is not None else None


def _try(call, *args):
    """call(*args), or None (logged once, and no window for the rest of the process) where
    the driver refuses."""
    global _status
    try:
        result = call(*args)
    except (OSError, AttributeError) as error:
        _refuse(str(error))
        return None
    _status = "on"
    return True if result is None else result


def _refuse(why: str) -> None:
    global _status
    log.warning("memcompile: no L2 access policy window (%s); kernels run without it", why)
    _status = f"off: {why}"
