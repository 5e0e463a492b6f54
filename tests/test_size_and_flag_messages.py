"""What the CLI outputs for sizes and options it refuses: a memory too large to build is
one line saying what it needs (not the allocator's error), negative sizes are called
negative, byte counts past GiB keep their unit, and the library's argument names are
spelled as the flags."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import SMALL, one_error, run_cli

import memcompile
from memcompile.cli.common import in_flags
from memcompile.runtime import MemcompileError, MemoryConfig, MemoryLayer, config
from memcompile.runtime.config import human_bytes

from models import CASES, build

LLAMA = next(c for c in CASES if c.name == "llama")
GiB = 2**30


@pytest.fixture
def memory_16gib(monkeypatch):
    """This machine, as one with 16 GiB: the messages quote its memory."""
    monkeypatch.setattr(config, "host_memory", lambda: 16 * GiB)


@pytest.mark.parametrize("lazy", [[], ["--lazy-init"]])
def test_sub_keys_too_large_for_memory_are_refused_before_allocating(
    hf_dir, tmp_path, memory_16gib, lazy
):
    out = tmp_path / "out"
    result = run_cli("convert", hf_dir, "--layers", "1", *SMALL[2:], "--mem-size", 10**20, *lazy,
                  "-o", out)  # fmt: skip
    # llama's d_model is 32: k_dim 32, 16 per half; 2 heads; dtype unknown, so 2 bytes.
    assert one_error(result) == (
        "error: --mem-size 100,000,000,000,000,000,000 (= 10,000,000,000**2) is too large: its "
        "sub-keys alone (heads 2 x 2 halves x 10,000,000,000 keys x 16 = --k-dim/2) need at "
        "least 1.2 TiB, more than the 16.0 GiB of memory here: choose a smaller --mem-size"
    )
    assert not out.exists()


def test_transform_refuses_them_too_and_leaves_the_model_as_it_was(memory_16gib):
    model = build(LLAMA)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(MemcompileError, match=r"sub-keys alone .* need at least 2\.3 TiB"):
        memcompile.transform(model, layers=[1], mem_size=10**20, lazy_init=True)
    assert not any(isinstance(m, MemoryLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], p) for name, p in before.items())


def test_the_limit_is_the_bytes_of_the_sub_keys(monkeypatch):
    # 1 head x 2 halves x 256 keys x 32 values x 4 bytes (float32) = 65,536 bytes.
    settings = dict(mem_size=256**2, heads=1, knn=4, k_dim=64, dtype="float32")
    monkeypatch.setattr(config, "host_memory", lambda: 65_536)
    assert MemoryConfig(**settings).resolve(64).k_dim == 64
    monkeypatch.setattr(config, "host_memory", lambda: 65_535)
    with pytest.raises(MemcompileError, match=r"need 64\.0 KiB, more than the 64\.0 KiB"):
        MemoryConfig(**settings).resolve(64)
    monkeypatch.setattr(config, "host_memory", lambda: None)  # an OS that does not say
    assert MemoryConfig(**settings).resolve(64).k_dim == 64


def test_a_value_table_no_tensor_can_hold_is_refused_whatever_the_memory(monkeypatch):
    monkeypatch.setattr(config, "host_memory", lambda: None)
    with pytest.raises(MemcompileError, match=r"6\.4e\+21 entries, more than a tensor can hold"):
        MemoryConfig(mem_size=10**20, knn=4, heads=1).resolve(64)


def test_a_far_too_large_size_that_is_no_square_says_so(hf_dir, tmp_path, memory_16gib):
    result = run_cli("convert", hf_dir, "--layers", "1", "-q", "--mem-size", 10**21, "-o",
                  tmp_path / "out")  # fmt: skip
    error = one_error(result)
    assert "is not a perfect square, and far too large" in error
    assert "more than the 16.0 GiB of memory here" in error and "nearest" not in error
    # A size that is merely no square keeps naming its neighbours.
    error = one_error(run_cli("convert", hf_dir, "--layers", "1", "-q", "--mem-size", 10**12 + 1,
                            "-o", tmp_path / "out"))  # fmt: skip
    assert "nearest valid sizes: 976562500K (= 1000000**2) or 1000002000001" in error


@pytest.mark.parametrize("size", ["-1", "-64K", " - 4 "])
def test_a_negative_size_is_called_one(hf_dir, tmp_path, size):
    result = run_cli("convert", hf_dir, "--layers", "1", "-q", f"--mem-size={size}", "-o",
                  tmp_path / "out")  # fmt: skip
    assert one_error(result) == (
        f"error: --mem-size must be positive (a number of value rows), got {size!r}"
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1023, "1023.0 B"),
        (1.5 * GiB, "1.5 GiB"),
        (1024 * GiB, "1.0 TiB"),
        (2**50 * 3, "3.0 PiB"),
        (2**60, "1.0 EiB"),
        (2.56e22, "21.7 ZiB"),
        (2**90, "1,024.0 YiB"),
    ],
)
def test_byte_counts_past_gib_keep_their_unit(n, text):
    assert human_bytes(n) == text


def test_inspect_writes_a_huge_table_in_tib(hf_dir):
    result = run_cli("inspect", hf_dir, "--mem-size", 2**40, "-q")  # 2**20 keys, 1M x 1M rows
    assert result.exit_code == 0, result.output
    # llama's d_model is 32: 2**40 x 32 values x 4 bytes = 2**47 bytes.
    assert "(float32 128.0 TiB, bfloat16 64.0 TiB, float16 64.0 TiB)" in result.output


@pytest.fixture(scope="module")
def checkpoint_dir(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    assert run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", path).exit_code == 0
    return path


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["convert", "{hf}", "--layers", "1", "--mem-size", "256", "--heads", "0"],
         "error: --heads must be an integer >= 1, got 0"),
        (["inspect", "{hf}", "--mem-size", "256", "--heads", "-2"],
         "error: --heads must be an integer >= 1, got -2"),
        (["convert", "{hf}", "--layers", "1", "--mem-size", "256", "--knn", "4", "--seed",
          str(2**64)], f"error: --seed must fit in 64 bits (a signed int64), got {2**64}"),
        (["convert", "{hf}", "--layers", "1", "--mem-size", "256", "--knn", "4", "--gating",
          "none", "--v-dim", "8"],
         "error: --gating none needs --v-dim == d_out (32), got --v-dim=8: drop --v-dim or use "
         "--gating swilu"),
        (["calibrate", "{ckpt}", "--original", "{hf}", "--synthetic", "--lr", "-1"],
         "error: --lr must be a positive number, got -1.0"),
        (["calibrate", "{ckpt}", "--original", "{hf}", "--synthetic", "--lr", "0"],
         "error: --lr must be a positive number, got 0.0"),
    ],
)  # fmt: skip
def test_errors_spell_the_options_as_flags(hf_dir, checkpoint_dir, tmp_path, command, expected):
    args = [a.format(hf=hf_dir, ckpt=checkpoint_dir) for a in command]
    out = tmp_path / "out"
    assert (
        one_error(run_cli(*args, "-q", *(["-o", out] if args[0] != "inspect" else []))) == expected
    )
    assert not out.exists()


def test_only_the_named_options_are_rewritten_not_the_words():
    assert in_flags("heads must be >= 1") == "--heads must be >= 1"
    assert in_flags("calibrate: lr must be positive") == "calibrate: --lr must be positive"
    for unchanged in [
        "the memory has 4 heads",
        "param_groups: 10 tensors at lr 0.001",
        "value_lr must be a positive number, got 0",
        "lr_lambda must return a number",
        "the seed must be kept",
    ]:
        assert in_flags(unchanged) == unchanged
