"""The L2 access policy window (kernels/l2_residency.py) speaks the CUDA driver's ABI: its
structures and constants against cuda.h (Triton ships the header with its CUDA backend),
and it leaves tensors that are not on a CUDA GPU alone. Its effect, a faster row pass, is
timed by bench_kernels.py's sweep on a GPU, and the row-pass tests run with it there."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch
import triton

from memcompile.kernels import l2_residency

CUDA_H = Path(triton.__file__).parent / "backends" / "nvidia" / "include" / "cuda.h"


@pytest.fixture(scope="module")
def header() -> str:
    if not CUDA_H.exists():
        pytest.fail(f"Triton's cuda.h is missing at {CUDA_H}: the triton install is incomplete")
    return CUDA_H.read_text(errors="replace")


def _value(header: str, name: str) -> int:
    found = re.search(rf"\b{name}\s*=\s*(0x[0-9a-fA-F]+|\d+)", header)
    assert found, name
    return int(found.group(1), 0)


def test_constants_match_cuda_h(header):
    for name in ("CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE",
                 "CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE",
                 "CU_LIMIT_PERSISTING_L2_CACHE_SIZE", "CU_ACCESS_PROPERTY_NORMAL",
                 "CU_ACCESS_PROPERTY_PERSISTING"):  # fmt: skip
        assert getattr(l2_residency, f"_{name}") == _value(header, name), name
    # The stream attribute is an alias of the launch attribute of the same name.
    assert re.search(r"#define CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW\s+"
                     r"CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW\b", header)  # fmt: skip
    assert l2_residency._CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW == _value(
        header, "CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW"
    )


def test_policy_window_layout_matches_cuda_h(header):
    body = re.search(r"typedef struct CUaccessPolicyWindow_st \{(.*?)\}", header, re.S).group(1)
    fields = re.findall(r"^\s*([A-Za-z_][\w ]*?)\s*\*?\s*(\w+);", body, re.M)
    c_types = {"void": ctypes.c_void_p, "size_t": ctypes.c_size_t, "float": ctypes.c_float,
               "CUaccessProperty": ctypes.c_int}  # fmt: skip
    ours = l2_residency.AccessPolicyWindow._fields_
    assert [name for _, name in fields] == [name for name, _ in ours]
    assert [c_types[kind] for kind, _ in fields] == [kind for _, kind in ours]
    # The attribute value is a union padded to 64 bytes; the driver reads the window at 0.
    assert re.search(r"typedef union CUlaunchAttributeValue_union \{\s*char pad\[64\];", header)
    assert ctypes.sizeof(l2_residency.StreamAttrValue) == 64
    assert l2_residency.StreamAttrValue.accessPolicyWindow.offset == 0


def test_tensors_off_a_cuda_gpu_get_no_window(monkeypatch):
    def no_driver():
        raise AssertionError("the driver was called for a host tensor")

    monkeypatch.setattr(l2_residency, "_driver", no_driver)
    with l2_residency.persisting(torch.ones(1000)) as set_up:
        assert set_up is False
    assert l2_residency.status() == "unused"


def test_share_of_lines_that_persist_fits_the_set_aside():
    # 30 MB of set-aside for a 33 MB block of gathered rows: 30/33 of its lines persist;
    # a block smaller than the set-aside persists whole.
    assert l2_residency.window(4096, 67 << 20, 30 << 20, 33 << 20).hitRatio == pytest.approx(
        30 / 33, rel=1e-6
    )
    policy = l2_residency.window(4096, 67 << 20, 30 << 20, 10 << 20)
    assert policy.hitRatio == 1.0 and policy.num_bytes == 67 << 20 and policy.base_ptr == 4096
    assert policy.hitProp == l2_residency._CU_ACCESS_PROPERTY_PERSISTING


class FakeDriver:
    """libcuda's calls that l2_residency makes, recorded; `refuse` names one that fails."""

    SET_ASIDE, LARGEST_WINDOW = 30 << 20, 128 << 20

    def __init__(self, refuse: str | None = None):
        self.calls, self.windows, self.refuse = [], [], refuse

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == self.refuse:
                return 1  # CUDA_ERROR_INVALID_VALUE
            if name == "cuDeviceGetAttribute":
                attribute = args[1]
                args[0]._obj.value = (
                    self.SET_ASIDE
                    if attribute == l2_residency._CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE
                    else self.LARGEST_WINDOW
                )
            if name == "cuCtxSetLimit":
                self.limit = (args[0], args[1].value)
            if name == "cuStreamSetAttribute":
                policy = args[2]._obj.accessPolicyWindow
                self.windows.append((args[0].value, policy.base_ptr, policy.num_bytes,
                                     round(policy.hitRatio, 4), policy.hitProp))  # fmt: skip
            return 0

        return call


@pytest.fixture
def on_a_fake_gpu(monkeypatch):
    """A CUDA device and stream as torch would report them, and no real driver."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    monkeypatch.setattr(l2_residency, "_status", "unused")
    l2_residency._set_aside.cache_clear()
    monkeypatch.setattr(torch.cuda, "device", lambda *_: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *_: SimpleNamespace(cuda_stream=77))
    tensor = SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: 1 << 25,
                             element_size=lambda: 2, data_ptr=lambda: 4096)  # fmt: skip
    yield tensor
    l2_residency._set_aside.cache_clear()


def test_window_is_set_for_the_kernels_inside_and_cleared_after(monkeypatch, on_a_fake_gpu):
    driver = FakeDriver()
    monkeypatch.setattr(l2_residency, "_driver", lambda: driver)
    with l2_residency.persisting(on_a_fake_gpu, active_bytes=32 << 20) as set_up:
        assert set_up and l2_residency.status() == "on"
        # The set-aside is the device's maximum; the window covers the 64 MB tensor, and
        # the share that persists is what 30 MB of set-aside holds of 32 MB gathered.
        assert driver.limit == (l2_residency._CU_LIMIT_PERSISTING_L2_CACHE_SIZE, 30 << 20)
        assert driver.windows == [(77, 4096, 64 << 20, round(30 / 32, 4), 2)]
        assert driver.calls.index("cuCtxResetPersistingL2Cache") < driver.calls.index(
            "cuStreamSetAttribute"
        )
    assert driver.windows[-1][2] == 0  # off once the kernels are launched
    with l2_residency.persisting(on_a_fake_gpu):  # the set-aside is set once a device
        pass
    assert driver.calls.count("cuCtxSetLimit") == 1 and len(driver.windows) == 4


@pytest.mark.parametrize("refused", ["cuCtxSetLimit", "cuStreamSetAttribute"])
def test_a_refusing_driver_turns_the_window_off_for_the_process(
    monkeypatch, on_a_fake_gpu, refused, caplog
):
    driver = FakeDriver(refuse=refused)
    monkeypatch.setattr(l2_residency, "_driver", lambda: driver)
    with l2_residency.persisting(on_a_fake_gpu) as set_up:
        assert not set_up
    assert l2_residency.status() == f"off: {refused} returned CUresult 1"
    assert "no L2 access policy window" in caplog.text
    calls = len(driver.calls)
    with l2_residency.persisting(on_a_fake_gpu) as set_up:
        assert not set_up
    assert len(driver.calls) == calls  # not asked again
