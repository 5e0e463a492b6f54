"""Options that were ignored or misread: each now gets one `error:` line, exit 2, and
nothing on disk, instead of being dropped or replacing an input."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
from cli_helpers import SMALL, one_error, run_cli

import memcompile
from memcompile.cli.common import layer_labels

from models import CASES, build

LLAMA = next(c for c in CASES if c.name == "llama")


@pytest.fixture(scope="module")
def checkpoint_dir(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    assert run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", path).exit_code == 0
    return path


def test_force_never_replaces_the_config_an_input_needs(hf_dir, tmp_path):
    state_file, config = tmp_path / "weights.pt", tmp_path / "config.json"
    torch.save(build(LLAMA).state_dict(), state_file)
    config.write_bytes((hf_dir / "config.json").read_bytes())
    result = run_cli("convert", state_file, "--config", config, "--layers", "1", *SMALL,
                  "-o", config, "--force")  # fmt: skip
    assert "would write into the input" in one_error(result)
    assert config.read_bytes() == (hf_dir / "config.json").read_bytes()


def test_export_to_a_directory_says_so_before_asking_for_force(checkpoint_dir, tmp_path):
    (tmp_path / "out").mkdir()
    for force in ([], ["--force"]):
        result = run_cli("export", checkpoint_dir, "--onnx", tmp_path / "out", *force)
        assert "is a directory" in one_error(result)
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_an_example_longer_than_the_models_positions(checkpoint_dir, tmp_path):
    positions = build(LLAMA).config.max_position_embeddings
    out = tmp_path / "m.onnx"
    result = run_cli("export", checkpoint_dir, "--onnx", out, "--seq-len", positions + 1)
    assert f"at most {positions}" in one_error(result)
    assert not out.exists()


@pytest.mark.parametrize("option", [["--knn", "8"], ["--no-share"], ["--heads", "2"]])
def test_inspect_refuses_memory_options_without_a_memory(hf_dir, option):
    line = one_error(run_cli("inspect", hf_dir, *option))
    assert f"{option[0].removeprefix('--no-')}" in line and "add --mem-size" in line
    assert "----" not in line
    assert run_cli("inspect", hf_dir, "--mem-size", "4K", *option).exit_code == 0


def test_calibrate_checks_max_length_and_uses_it_for_synthetic_samples(
    hf_dir, checkpoint_dir, tmp_path, monkeypatch
):
    out = tmp_path / "cal"
    args = ("calibrate", checkpoint_dir, "--original", hf_dir, "--synthetic", "--steps", "1")
    result = run_cli(*args, "--max-length", "0", "-o", out)
    assert "--max-length must be at least 1" in one_error(result)
    result = run_cli(*args, "--seed", 2**64, "-o", out)
    assert "--seed must fit in 64 bits" in one_error(result)
    assert not out.exists()

    calibrate = importlib.import_module("memcompile.calibrate")  # the package exports a function
    lengths = []
    real = calibrate.synthetic_batches

    def recorded(model, **kwargs):
        batches = real(model, **kwargs)
        lengths.append(batches[0]["input_ids"].shape[1])
        return batches

    monkeypatch.setattr(calibrate, "synthetic_batches", recorded)
    assert run_cli(*args, "--max-length", "5", "-q", "-o", out).exit_code == 0
    assert run_cli(*args, "-q", "-o", tmp_path / "cal2").exit_code == 0
    assert lengths == [5, 64]


def test_python_api_errors_name_the_fix():
    model = build(LLAMA)
    with pytest.raises(memcompile.MemcompileError, match=r"layers=\[1, 2\]"):
        memcompile.transform(model, layers="1,2", mem_size="4K")
    with pytest.raises(memcompile.MemcompileError, match="got 1.0"):
        memcompile.transform(model, layers=1.0, mem_size="4K")
    with pytest.raises(memcompile.MemcompileError, match="needs a torch.nn.Module, got str"):
        memcompile.find_ffn_blocks("model.pt")


def test_a_config_for_a_model_that_has_its_own_is_refused(hf_dir, checkpoint_dir, tmp_path):
    config = hf_dir / "config.json"
    for model in (hf_dir, checkpoint_dir):
        out = tmp_path / "out"
        result = run_cli("convert", model, "--config", config, "--layers", "0", *SMALL, "-o", out)
        assert "drop --config" in one_error(result)
        assert not out.exists()


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("4,12", ["4", "12"]),
        ("0-2", ["0", "1", "2"]),
        ("encoder.0-1, decoder.1", ["encoder.0", "encoder.1", "decoder.1"]),
        ("model.layers.3-4", ["model.layers.3", "model.layers.4"]),
    ],
)
def test_layer_labels_expand_ranges_also_within_a_stack(text, labels):
    assert layer_labels(text) == labels


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1,", "has an empty entry"),
        ("1,,2", "has an empty entry"),
        (" ", "--layers is empty"),
        ("encoder.3-1", "write encoder.1-3"),
    ],
)
def test_layer_labels_refuse_what_they_cannot_mean(text, says):
    with pytest.raises(memcompile.MemcompileError, match=says):
        layer_labels(text)


def test_a_stack_range_converts_those_blocks(tmp_path):
    from zoo import ZOO

    t5 = next(case for case in ZOO if case.name == "t5").build()
    t5.save_pretrained(tmp_path / "t5")
    args = ["--mem-size", "256", "--knn", "4", "--heads", "2", "--json", "-q"]
    result = run_cli("convert", tmp_path / "t5", "--layers", "encoder.0-1", *args, "-o",
                  tmp_path / "out")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["converted"] == ["encoder.0", "encoder.1"]


def test_a_reader_that_leaves_the_pipe_early_is_no_internal_error():
    # `memcompile inspect ... --json | head -c 1`: the reader closes the pipe before the
    # command has written everything (a large output: more than the pipe's buffer).
    script = (
        "import sys, click\n"
        "from memcompile.cli.common import fail_cleanly\n"
        "@click.command()\n"
        "@fail_cleanly\n"
        "def big():\n"
        "    for _ in range(100000):\n"
        "        click.echo('x' * 100)\n"
        "big()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout.read(1) == b"x"
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""
