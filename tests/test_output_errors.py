"""Writes the file system refuses (read-only, no permission, a name too long, a full disk,
a quota) are bad input: exit 2, one `error:` line naming the output and what to do, and
nothing left on disk. Other write failures stay internal errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from cli_helpers import SMALL, one_error, run_cli
from safetensors import SafetensorError

from memcompile import checkpoint
from memcompile.runtime import MemcompileError, outputs
from memcompile.runtime.outputs import atomic_directory, atomic_file, write_error

from models import CASES

LLAMA = next(c for c in CASES if c.name == "llama")


@pytest.fixture
def out_dir(tmp_path):
    """An empty directory for the outputs: whatever is in it after a test was left there."""
    path = tmp_path / "outputs"
    path.mkdir()
    return path


def test_a_name_too_long_is_one_line(hf_dir, out_dir):
    out = out_dir / ("x" * 300)
    error = one_error(run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out))
    assert error == (
        f"error: cannot write {out}: file name too long: give the output a shorter name"
    )
    assert list(out_dir.iterdir()) == []


def test_a_name_of_the_full_length_is_staged_under_a_shorter_one(out_dir):
    # 250 characters: the output's name fits (255), the staged name must be cut to fit too.
    path = out_dir / ("n" * 245 + ".json")
    with atomic_file(path) as staged:
        assert len(staged.name) < 100
        staged.write_text("{}")
    directory = out_dir / ("d" * 250)
    with atomic_directory(directory) as staged:
        (staged / "a.txt").write_text("a")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([path.name, directory.name])
    assert path.read_text() == "{}" and (directory / "a.txt").read_text() == "a"


def _read_only(monkeypatch, directory: Path) -> None:
    """`directory` as on a read-only mount (root may write anywhere else: chmod stops it not)."""
    real_access, real_statvfs = os.access, os.statvfs
    read_only = os.statvfs(directory)

    class ReadOnly:
        f_flag = read_only.f_flag | os.ST_RDONLY

    def access(path, mode, **kwargs):
        if Path(path) == directory and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    def statvfs(path):
        return ReadOnly() if Path(path) == directory else real_statvfs(path)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "statvfs", statvfs)


def test_a_read_only_directory_is_refused_before_converting(hf_dir, out_dir, monkeypatch):
    _read_only(monkeypatch, out_dir)
    converted = []
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: converted.append(a))
    out = out_dir / "new" / "ckpt"
    error = one_error(run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out))
    assert error == (
        f"error: cannot write {out}: read-only file system: choose another output path"
    )
    assert converted == [] and list(out_dir.iterdir()) == []


def test_a_refusal_while_staging_is_one_line_and_leaves_no_folders(hf_dir, out_dir, monkeypatch):
    # As if the file system turned read-only (or denied us) after the checks at the start.
    real_mkdtemp = tempfile.mkdtemp
    out = out_dir / "new" / "ckpt"

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == out.parent:
            name = os.path.join(dir, f"{prefix}abc")
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), name)
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    error = one_error(run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out))
    assert error == f"error: cannot write {out}: permission denied: choose another output path"
    assert list(out_dir.iterdir()) == []  # nor the folder "new" made for it


def test_a_full_disk_under_safetensors_is_one_line(hf_dir, out_dir, monkeypatch):
    def save_to_a_full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        # What safetensors raises on ENOSPC (seen on a full tmpfs): no OSError, the errno
        # only in its text. (Not /dev/full: safetensors would replace the device file.)
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(checkpoint, "save_file", save_to_a_full_disk)
    out = out_dir / "new" / "ckpt"
    error = one_error(run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out))
    assert error == (
        f"error: cannot write {out}: no space left on device: free some space or choose "
        "another output path"
    )
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.EDQUOT, "disk quota exceeded: free some space"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_a_failed_write_of_the_staged_files_is_one_line(hf_dir, out_dir, monkeypatch, code, says):
    def refused(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(code, os.strerror(code))  # write() names no file

    monkeypatch.setattr(checkpoint, "save_file", refused)
    out = out_dir / "ckpt"
    error = one_error(run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out))
    assert error.startswith(f"error: cannot write {out}: {says}")
    assert list(out_dir.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc file system here")
def test_an_output_on_a_pseudo_file_system_is_one_line(hf_dir):
    """/proc creates no files: root gets ENOENT for a new name in it, others EACCES."""
    out = Path("/proc") / f"memcompile-test-{os.getpid()}"
    error = one_error(run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out))
    assert error.startswith(f"error: cannot write {out}: ")
    assert error.endswith("choose another output path")
    with pytest.raises(MemcompileError, match="choose another output path"):
        with atomic_file(out.with_suffix(".onnx")) as staged:
            staged.write_text("{}")
    # said before any work: refuse_existing tries the directory with a file of its own
    with pytest.raises(MemcompileError, match=f"cannot write {out}: .* choose another output"):
        outputs.refuse_existing(out, force=True)


def test_an_io_error_stays_an_internal_error_and_leaves_nothing(hf_dir, out_dir, monkeypatch):
    def broken(tensors, filename, metadata=None):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(checkpoint, "save_file", broken)
    result = run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out_dir / "ckpt")
    assert result.exit_code == 1 and "internal error: OSError" in result.output
    assert list(out_dir.iterdir()) == []


def test_only_errors_about_the_output_are_blamed_on_it(tmp_path):
    out = tmp_path / "out"
    denied = errno.EACCES, os.strerror(errno.EACCES)
    for about_the_output in [
        OSError(*denied, str(out)),
        OSError(*denied, str(tmp_path)),  # the directory it goes in
        OSError(*denied, str(tmp_path / ".out.tmp-x1y2" / "model.safetensors")),
        OSError(*denied, str(tmp_path / ".out.tmp-x1y2"), str(out)),  # a rename
        OSError(errno.ENOSPC, "No space left on device"),  # write() names no file
    ]:
        assert isinstance(write_error(out, about_the_output), MemcompileError)
    assert write_error(out, OSError(*denied, str(tmp_path / "model.pt"))) is None  # an input
    assert write_error(out, OSError(errno.EIO, "Input/output error")) is None
    assert write_error(out, RuntimeError("No space left on device (os error 28)")) is None


def test_a_full_disk_under_save_program_is_one_line_and_leaves_nothing(tmp_path):
    # torch's zip writer aborts the process when a write fails under it (its destructor
    # retries and throws in C++); save_program hands it a file that holds the error, and
    # raises it after. The staged file's writes go to /dev/full (Linux: every write fails
    # with ENOSPC). In a child process: an abort would take pytest down with it.
    script = textwrap.dedent(
        """
        import builtins, sys, torch
        from memcompile.program import save_program
        from memcompile.runtime import MemcompileError, outputs

        def full_disk(path, mode="r", *args, **kwargs):
            full = "w" in mode and ".tmp-" in str(path)
            return builtins.open("/dev/full" if full else path, mode, *args, **kwargs)

        outputs.open = full_disk  # the name deferred_write_errors opens with
        program = torch.export.export(torch.nn.Linear(64, 64), (torch.ones(2, 64),))
        try:
            save_program(program, sys.argv[1] + "/out.pt2")
        except MemcompileError as error:
            print(error)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (
        f"cannot write {tmp_path}/out.pt2: no space left on device: free some space or "
        "choose another output path"
    )
    assert list(tmp_path.iterdir()) == []


def test_deferred_write_errors_writes_what_it_is_given(tmp_path):
    path = tmp_path / "data.bin"
    with outputs.deferred_write_errors(path) as file:
        file.write(b"abc")
        file.write(memoryview(b"defg"))
        assert file.tell() == 7
    assert path.read_bytes() == b"abcdefg"


def test_force_never_replaces_a_file_an_input_folder_links_to(tmp_path):
    """An HF cache's snapshot folder holds links into blobs/: the blob is the input too."""
    snapshot, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    snapshot.mkdir()
    blobs.mkdir()
    (blobs / "abc123").write_text("weights")
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123")
    with pytest.raises(MemcompileError, match="would write into the input"):
        outputs.refuse_existing(blobs / "abc123", force=True, inputs=[snapshot])
    outputs.refuse_existing(blobs / "another", force=True, inputs=[snapshot])  # fine
    assert (blobs / "abc123").read_text() == "weights"
