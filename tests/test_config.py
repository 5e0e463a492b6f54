"""MemoryConfig and parse_mem_size: size parsing, validation, defaults, error messages."""

from __future__ import annotations

import math

import pytest
import torch

import memcompile
from memcompile import MemcompileError, MemoryConfig

parse_mem_size = memcompile.runtime.parse_mem_size


def _neighbour_roots(n: int) -> tuple[int, int]:
    """Brute force: the largest r with r*r <= n and the smallest r with r*r >= n."""
    below = max(r for r in range(1, n + 2) if r * r <= n)
    above = min(r for r in range(1, n + 2) if r * r >= n)
    return below, above


def _raises_one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(MemcompileError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message, "error message is empty"
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


def test_error_type_is_value_error():
    assert issubclass(MemcompileError, ValueError)
    assert memcompile.MemcompileError is MemcompileError
    assert memcompile.MemoryConfig is MemoryConfig


@pytest.mark.parametrize(
    "text, root",
    [
        ("64K", 256),
        ("64k", 256),
        (" 64K ", 256),
        ("1M", 1024),
        ("16M", 4096),
        ("4M", 2048),
        ("1G", 32768),
        ("1K", 32),
        ("256", 16),
        ("1", 1),
    ],
)
def test_parse_suffixed_sizes(text, root):
    assert parse_mem_size(text) == root**2


@pytest.mark.parametrize("n", [1, 4, 9, 961, 1024, 65536, 1024**2])
def test_parse_int_sizes(n):
    assert parse_mem_size(n) == n
    config = MemoryConfig(mem_size=n, knn=1)
    assert config.mem_size == n
    assert config.n_keys == math.isqrt(n)


def test_config_normalises_mem_size():
    config = MemoryConfig(mem_size="64K", knn=32)
    assert config.mem_size == 65536
    assert config.n_keys == 256
    assert MemoryConfig().mem_size == 1024**2  # default 1M
    assert MemoryConfig().n_keys == 1024


@pytest.mark.parametrize("size, n", [("2M", 2 * 2**20), (1000, 1000), ("3K", 3 * 1024), (2, 2)])
def test_non_square_names_nearest_sizes(size, n):
    below, above = _neighbour_roots(n)
    assert below * below < n < above * above
    message = _raises_one_line(parse_mem_size, size)
    # runtime/config.py writes each option as "<size> (= <root>**2)".
    assert f"{below}**2" in message
    assert f"{above}**2" in message
    # The config constructor reports the same error.
    assert _raises_one_line(MemoryConfig, mem_size=size, knn=1) == message


def test_non_square_1000_message_format():
    message = _raises_one_line(parse_mem_size, 1000)
    assert "961 (= 31**2)" in message
    assert "1K (= 32**2)" in message  # 1024 is written with its suffix


@pytest.mark.parametrize(
    "garbage", ["", "M", "abc", "1.5M", "-4", "1T", "64KB", "1 M M", "0x10", "1e6"]
)
def test_garbage_size_strings(garbage):
    _raises_one_line(parse_mem_size, garbage)
    _raises_one_line(MemoryConfig, mem_size=garbage)


@pytest.mark.parametrize("bad", [0, -4, True, 4.0, None, [4]])
def test_bad_size_values(bad):
    _raises_one_line(parse_mem_size, bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mem_size": "64K", "knn": 257},  # n_keys = 256
        {"mem_size": 16, "knn": 5},
        {"knn": 0},
        {"knn": -1},
        {"knn": True},
        {"knn": 2.0},
        {"heads": 0},
        {"heads": -2},
        {"heads": True},
        {"k_dim": 7},
        {"k_dim": 0},
        {"v_dim": 0},
        {"v_dim": -3},
        {"v_dim": True},
        {"k_dim": True},
        {"k_dim": 8.0},
        {"gating": "gelu"},
        {"gating": "SwiLU "},
        {"mode": "merge"},
        {"dtype": "float64"},
        {"dtype": "fp16"},
        {"dtype": torch.float64},
        {"seed": 2**63},
        {"seed": -(2**63) - 1},
    ],
)
def test_invalid_fields(kwargs):
    _raises_one_line(MemoryConfig, **kwargs)


def test_knn_equal_to_n_keys_is_fine():
    assert MemoryConfig(mem_size=16, knn=4).knn == 4
    assert MemoryConfig(mem_size=1, knn=1).n_keys == 1


def test_knn_too_large_message_suggests_fix():
    message = _raises_one_line(MemoryConfig, mem_size=16, knn=5)
    assert "knn" in message
    assert "4" in message  # the largest usable knn
    assert "25 (= 5**2)" in message  # the smallest mem_size that fits knn=5
    assert "6**2" not in message


def test_valid_strings():
    for gating in ("swilu", "none"):
        for mode in ("replace", "augment"):
            config = MemoryConfig(mem_size=64, knn=2, gating=gating, mode=mode)
            assert (config.gating, config.mode) == (gating, mode)
    assert MemoryConfig(mem_size=64, knn=2, dtype="bfloat16").torch_dtype is torch.bfloat16
    assert MemoryConfig(mem_size=64, knn=2, dtype="float16").torch_dtype is torch.float16
    assert MemoryConfig(mem_size=64, knn=2).torch_dtype is None
    as_dtype = MemoryConfig(mem_size=64, knn=2, dtype=torch.bfloat16)  # a torch.dtype too
    assert as_dtype.dtype == "bfloat16" and as_dtype.to_dict()["dtype"] == "bfloat16"


def test_defaults():
    config = MemoryConfig()
    assert config.heads == 4
    assert config.knn == 32
    assert config.k_dim is None and config.v_dim is None
    assert config.gating == "swilu"
    assert config.share_values is True
    assert config.mode == "replace"


@pytest.mark.parametrize("d_model", [16, 64, 512, 768, 4096])
def test_resolve_defaults(d_model):
    resolved = MemoryConfig(mem_size=64, knn=4).resolve(d_model)
    assert resolved.k_dim == min(512, d_model)
    assert resolved.v_dim == d_model


def test_resolve_keeps_explicit_dims_and_other_fields():
    config = MemoryConfig(mem_size=64, knn=4, heads=2, k_dim=32, v_dim=48, seed=7)
    resolved = config.resolve(768, 100)
    assert (resolved.k_dim, resolved.v_dim) == (32, 48)
    assert (resolved.heads, resolved.knn, resolved.seed, resolved.mem_size) == (2, 4, 7, 64)
    # The original is frozen and unchanged.
    assert config.k_dim == 32 and config.v_dim == 48
    unresolved = MemoryConfig(mem_size=64, knn=4)
    unresolved.resolve(128)
    assert unresolved.k_dim is None and unresolved.v_dim is None


def test_resolve_gating_none_needs_matching_v_dim():
    config = MemoryConfig(mem_size=64, knn=4, gating="none")
    message = _raises_one_line(config.resolve, 64, 32)  # v_dim defaults to 64, d_out is 32
    assert "v_dim" in message
    assert config.resolve(64).v_dim == 64
    assert MemoryConfig(mem_size=64, knn=4, gating="none", v_dim=32).resolve(64, 32).v_dim == 32
    _raises_one_line(MemoryConfig(mem_size=64, knn=4, gating="none", v_dim=16).resolve, 64)
    # With swilu gating the out projection maps v_dim to d_out: any v_dim works.
    assert MemoryConfig(mem_size=64, knn=4, v_dim=16).resolve(64, 32).v_dim == 16


def test_to_dict_round_trip():
    config = MemoryConfig(mem_size="64K", knn=8, heads=2, qk_norm=True).resolve(96)
    data = config.to_dict()
    assert data["mem_size"] == 65536
    assert MemoryConfig(**data) == config
