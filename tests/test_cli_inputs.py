"""The CLI against the wrong inputs: files that are not models, pickles whose code is gone,
outputs that would replace an input or the current directory, missing extras; and what it
writes (atomically, with the umask's permissions)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import SMALL, run_cli

from memcompile.program import save_program

from models import CASES, build

LLAMA = next(c for c in CASES if c.name == "llama")
EXAMPLE = next(c for c in CASES if c.name == "example")


def _error_lines(result) -> list[str]:
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("config.json", b'{"model_type": "llama"}'),
        ("notes.txt", b"hello"),
        ("table.csv", b"a,b\n1,2\n"),
        ("empty.txt", b""),
        ("noise.bin", bytes(range(7, 107))),
    ],
)
def test_a_file_that_is_no_model_is_named_as_such(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for args in (["inspect", path], ["convert", path, "--layers", "1", "-q", "-o", "out"]):
        errors = _error_lines(run_cli(*args))
        assert len(errors) == 1 and "is not a model file memcompile reads" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_trusted_pickle_whose_code_cannot_be_imported(tmp_path, monkeypatch):
    (tmp_path / "ghost_model.py").write_text(
        "import torch\n\nclass Ghost(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import ghost_model

    torch.save(ghost_model.Ghost(), tmp_path / "ghost.pt")
    monkeypatch.delitem(sys.modules, "ghost_model")
    (tmp_path / "ghost_model.py").unlink()
    errors = _error_lines(run_cli("inspect", tmp_path / "ghost.pt", "--trust-pickle"))
    assert len(errors) == 1 and "PYTHONPATH" in errors[0] and "ghost_model" in errors[0]


def test_a_corrupt_program_is_one_line_on_stderr(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"garbage")
    done = subprocess.run(
        [sys.executable, "-m", "memcompile.cli", "convert", "bad.pt2", "--layers", "1", "-o",
         "out.pt2"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: bad.pt2 is not a torch.export program (.pt2): File is not a zip file"
    ]


def test_unreadable_weights_and_a_config_that_is_no_config_are_one_line(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # a header length of 2**64-1
    errors = _error_lines(run_cli("inspect", broken))
    assert len(errors) == 1 and "its weights do not load (SafetensorError" in errors[0]

    torch.save(build(LLAMA).state_dict(), tmp_path / "weights.pt")
    (tmp_path / "notes.txt").write_text("hello")
    for config, says in (("notes.txt", "is not a usable HF config"), ("gone", "does not exist")):
        # Read locally: "notes.txt" must not be looked up as a Hub repository.
        (tmp_path / "gone").mkdir(exist_ok=True)
        result = run_cli("inspect", tmp_path / "weights.pt", "--config", tmp_path / config)
        errors = _error_lines(result)
        assert len(errors) == 1 and says in errors[0], errors


def test_an_output_below_a_file_is_one_line(hf_dir, tmp_path):
    out = hf_dir / "config.json" / "converted"
    errors = _error_lines(run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out))
    assert errors == [f"error: {out} cannot be written: {hf_dir / 'config.json'} is a file, "
                      "not a directory"]  # fmt: skip


def test_force_never_replaces_the_input_or_the_current_directory(hf_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    for output in (".", "..", str(tmp_path)):
        errors = _error_lines(
            run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", output, "--force")
        )
        assert "current directory" in errors[0]
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]

    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    before = sorted(p.name for p in copy.iterdir())
    for output in (copy, copy / "model.safetensors", copy.parent):
        errors = _error_lines(
            run_cli("convert", copy, "--layers", "1", *SMALL, "-o", output, "--force")
        )
        assert "current directory" in errors[0] or "would write into the input" in errors[0]
    assert sorted(p.name for p in copy.iterdir()) == before


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644),
                                                              (0o077, 0o700, 0o600)])  # fmt: skip
def test_outputs_get_the_permissions_of_the_umask(hf_dir, tmp_path, umask, dir_mode, file_mode):
    previous = os.umask(umask)
    try:
        ckpt, plan = tmp_path / "ckpt", tmp_path / "plan.json"
        assert run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", ckpt).exit_code == 0
        assert run_cli("plan", ckpt, "--gpus", "2", "-q", "-o", plan).exit_code == 0
        program = torch.export.export(build(EXAMPLE).eval(), (torch.randint(0, 10, (2, 5)),))
        save_program(program, tmp_path / "example.pt2")
    finally:
        os.umask(previous)
    assert ckpt.stat().st_mode & 0o777 == dir_mode
    files = [*ckpt.iterdir(), plan, tmp_path / "example.pt2"]
    assert {path.name: path.stat().st_mode & 0o777 for path in files} == {
        path.name: file_mode for path in files
    }


def test_a_missing_extra_is_named_with_its_install_command(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    errors = _error_lines(run_cli("inspect", hf_dir, "-q"))
    assert len(errors) == 1 and "pip install 'memcompile[hf]'" in errors[0]


def test_errors_name_the_flags_not_the_python_arguments(hf_dir, tmp_path):
    for args, flag, argument in [
        (["--mem-size", "1Q"], "--mem-size", "mem_size"),
        (["--mem-size", "256", "--k-dim", "7", "--knn", "4"], "--k-dim", "k_dim"),
        (["--mem-size", "256"], "--knn=32 is larger", " knn"),
    ]:
        result = run_cli("convert", hf_dir, "--layers", "1", "-q", *args, "-o", tmp_path / "o")
        (error,) = _error_lines(result)
        assert flag in error and argument not in error
    first = tmp_path / "first"
    assert run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", first).exit_code == 0
    larger = ["--layers", "2", "--mem-size", "1024", "--knn", "4", "--heads", "2", "-q"]
    (error,) = _error_lines(run_cli("convert", first, *larger, "-o", tmp_path / "second"))
    assert "--no-share" in error and "share_values" not in error
    (error,) = _error_lines(run_cli("convert", first, *SMALL[2:], "--layers", "1", "-o", "x"))
    assert "layer 1 is already a memory layer" in error


def test_plan_names_the_input_it_takes_for_a_program(tmp_path):
    program = torch.export.export(build(EXAMPLE).eval(), (torch.randint(0, 10, (2, 5)),))
    path = save_program(program, tmp_path / "example.pt2")
    (error,) = _error_lines(run_cli("plan", path, "--gpus", "2", "-o", tmp_path / "plan.json"))
    assert "torch.export program" in error and "convert -o DIR" in error
    # The advice names a module as the source: a program converts only to a program.
    assert "from a module" in error and "a .pt2 converts only to .pt2" in error
    converted = run_cli("convert", path, *SMALL, "--layers", "1", "-o", tmp_path / "ckpt")
    (refusal,) = _error_lines(converted)
    assert ".pt2" in refusal
    assert not Path(tmp_path / "plan.json").exists()


@pytest.mark.parametrize(
    "args, says, command",
    [
        (["convert", "m.pt", "-o", "out"], "Missing option '--layers'", "memcompile convert"),
        (["convert", "m.pt", "--layers", "1", "--mode", "swap", "-o", "o"], "'swap'", "convert"),
        (["export"], "Missing argument 'CKPT'", "memcompile export"),
        (["convert", "m.pt", "-o"], "'-o' requires an argument", "memcompile convert"),
        (["frobnicate"], "No such command 'frobnicate'", "memcompile"),
        (["--bogus"], "No such option '--bogus'", "memcompile"),
    ],
)
def test_usage_errors_are_one_line_naming_the_help_to_read(args, says, command):
    result = run_cli(*args)
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith("error: ") and says in line and f"{command} --help'" in line


def test_a_bare_memcompile_still_shows_the_commands():
    result = run_cli()
    assert "Commands:" in result.output and "convert" in result.output
