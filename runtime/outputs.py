"""Writing outputs safely: refuse a path that must not be replaced; write atomically.

Every file or directory memcompile writes (checkpoints, .pt2 programs, plans) is staged
under a temporary name beside its destination and renamed into place, so a failed or
interrupted write leaves nothing half-written. Staged outputs get the permissions a plain
`open()` or `mkdir` would give (the umask's), not the private ones of `tempfile`. A write
that the file system refuses (read-only, no permission, a name too long, a full disk) is
bad input, a one-line `MemcompileError` naming the output, not an internal error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import MemcompileError

# What the user can do about each way the file system refuses a write; any other errno
# (EIO, ...) stays an internal error: it is no choice of theirs.
_ELSEWHERE = "choose another output path"
_REFUSALS = {
    code: refusal
    for name, refusal in [
        ("EROFS", ("read-only file system", _ELSEWHERE)),
        ("EACCES", ("permission denied", _ELSEWHERE)),
        ("EPERM", ("operation not permitted", _ELSEWHERE)),
        ("ENAMETOOLONG", ("file name too long", "give the output a shorter name")),
        ("ENOSPC", ("no space left on device", f"free some space or {_ELSEWHERE}")),
        ("EDQUOT", ("disk quota exceeded", f"free some space or {_ELSEWHERE}")),
        ("EFBIG", ("file too large for its file system", _ELSEWHERE)),
        # Creating a file in a directory that exists: a pseudo file system (/proc).
        ("ENOENT", ("the file system creates no files there", _ELSEWHERE)),
    ]
    if (code := getattr(errno, name, None)) is not None  # Windows lacks some
}
# Rust's io::Error text, which safetensors' SafetensorError (not an OSError) carries.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# Staged names keep only this much of the output's name: the output may have a name of
# the file system's full length (255), and the staged one adds to it.
_STAGED_NAME_CHARS = 64


def _staging_prefix(path: Path, kind: str) -> str:
    return f".{path.name[:_STAGED_NAME_CHARS]}.{kind}-"


def _errno(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    if type(error).__name__ == "SafetensorError":
        found = _RUST_OS_ERROR.search(str(error))
        return int(found.group(1)) if found else None
    return None


def _names_the_output(name: str | bytes, path: Path) -> bool:
    """Whether a file an OSError names is the output, a directory above it, or something
    staged beside it (by us or by a writer with its own staging, as ONNX export's)."""
    target, named = path.absolute(), Path(os.fsdecode(name)).absolute()
    prefix = f".{target.name[:_STAGED_NAME_CHARS]}"

    def staged(p: Path) -> bool:
        return p.parent == target.parent and p.name.startswith(prefix)

    return named == target or named in target.parents or any(map(staged, [named, *named.parents]))


def write_error(path: str | os.PathLike, error: BaseException) -> MemcompileError | None:
    """The bad-input error for `error`, raised while writing the output `path`, if the file
    system refused the write for a reason the user can act on; else None.

    An OSError that names files counts only if one of them is the output's (not an input
    read on the way); one without a name, as a failed `write()` raises, always does.
    """
    code = _errno(error)
    if code not in _REFUSALS:
        return None
    path = Path(path)
    if isinstance(error, OSError):
        names = [n for n in (error.filename, error.filename2) if isinstance(n, (str, bytes))]
        if names and not any(_names_the_output(n, path) for n in names):
            return None
    reason, fix = _REFUSALS[code]
    return MemcompileError(f"cannot write {path}: {reason}: {fix}")


@contextlib.contextmanager
def _refusals_as_bad_input(path: str | os.PathLike) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        translated = write_error(path, error)
        if translated is None:
            raise
        raise translated from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_existing(
    path: str | os.PathLike,
    force: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
    *,
    file: bool = False,
) -> None:
    """Bad input unless `path` is free or --force. Even with --force, never the current
    directory or one holding it, nor a path that holds one of `inputs` (None for an
    optional input not given) or already exists inside one (a new file beside an input's
    own files is fine); nor a path whose name is
    too long or that lies on a read-only file system or in a directory we may not write:
    said before the work whose result would then be lost, not when writing it. With `file`
    (the output is one file) an existing directory there is refused first, before "exists:
    pass --force", which cannot help."""
    with _refusals_as_bad_input(path):
        if file and Path(path).is_dir():
            raise MemcompileError(f"{path} is a directory: give the path of a file to write")
        _refuse_existing(path, force, inputs)


def _links_in(directory: Path, limit: int = 10_000) -> list[Path]:
    """The symbolic links inside `directory` (at most `limit` entries looked at)."""
    if not directory.is_dir():
        return []
    links = []
    for count, entry in enumerate(directory.rglob("*")):
        if count >= limit:
            break
        if entry.is_symlink():
            links.append(entry)
    return links


def _refuse_existing(
    path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None]
) -> None:
    target = Path(path).resolve()
    if _contains(target, Path.cwd().resolve()):
        raise MemcompileError(
            f"{path} is the current directory or holds it: write the output to a new path"
        )
    for source in (s for s in inputs if s):  # None or "": an optional input not given
        source_path = Path(source).resolve()
        # An input folder's links reach files elsewhere (an HF cache's snapshot -> blobs/).
        linked = [f.resolve() for f in _links_in(source_path)]
        if (
            _contains(target, source_path)
            or (_contains(source_path, target) and target.exists())
            or any(_contains(target, file) for file in linked)
        ):
            raise MemcompileError(
                f"{path} would write into the input {source}: write the output to a new path"
            )
    if Path(path).exists() and not force:
        raise MemcompileError(
            f"{path} already exists: choose another output or pass force=True (--force)"
        )
    existing = next(p for p in Path(path).absolute().parents if p.exists())
    if not existing.is_dir():
        raise MemcompileError(f"{path} cannot be written: {existing} is a file, not a directory")
    # access(2) answers for root too: it refuses writes to a read-only mount.
    effective = os.access in os.supports_effective_ids
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=effective):
        code = errno.EROFS if _on_read_only_mount(existing) else errno.EACCES
        raise OSError(code, os.strerror(code), str(existing))
    # What access(2) cannot tell: a file system that creates no files (/proc), say.
    try:
        handle, probe = tempfile.mkstemp(prefix=_staging_prefix(Path(path), "probe"), dir=existing)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(existing)) from None
    os.close(handle)
    os.unlink(probe)


def _on_read_only_mount(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows): call it a permission
        return False


def _replace(staged: Path, path: Path) -> None:
    """Move `staged` to `path`, replacing what is there; a directory on either side is
    moved aside first (rename cannot swap it) and put back if the move fails."""
    if not (path.exists() and (path.is_dir() or staged.is_dir())):
        os.replace(staged, path)
        return
    old = Path(tempfile.mkdtemp(prefix=_staging_prefix(path, "old"), dir=path.parent))
    os.rename(path, old / path.name)
    try:
        os.rename(staged, path)
    except BaseException:
        os.rename(old / path.name, path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def created_parents(path: str | os.PathLike) -> Iterator[None]:
    """Makes the missing directories above `path`; if the block fails, removes those it made
    (the ones still empty), so a failed write leaves no empty folders behind. A refusal of
    the file system, here or in the block, is a MemcompileError naming `path`."""
    with _refusals_as_bad_input(path):
        missing = [p for p in Path(path).absolute().parents if not p.exists()]  # deepest first
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            yield
        except BaseException:
            for directory in missing:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `path`; renames it to `path` if the block succeeds.

    An existing `path` is an error unless `force`. On any exception, KeyboardInterrupt
    included, the temporary directory is removed and nothing is left at `path`.
    """
    path = Path(path)
    refuse_existing(path, force)
    with created_parents(path):
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(path, "tmp"), dir=path.parent))
        try:
            yield tmp
            mask = _umask()
            for file in tmp.rglob("*"):
                file.chmod((0o777 if file.is_dir() else 0o666) & ~mask)
            tmp.chmod(0o777 & ~mask)
            _replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def staging_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside `path`, removed after the block, for outputs of
    several files that the block moves into place itself (an ONNX model and its weights)."""
    path = Path(path)
    with created_parents(path):
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(path, "tmp"), dir=path.parent))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields a temporary file path beside `path` (same suffix); renames it to `path` if the
    block succeeds, else removes it. An existing `path` is an error unless `force`."""
    path = Path(path)
    refuse_existing(path, force, file=True)
    with created_parents(path):
        handle, name = tempfile.mkstemp(path.suffix, _staging_prefix(path, "tmp"), path.parent)
        os.close(handle)
        tmp = Path(name)
        try:
            yield tmp
            tmp.chmod(0o666 & ~_umask())
            _replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class _HeldErrorsFile(io.RawIOBase):
    """A file whose write errors are kept for later, not raised to the writer: each write
    reports all its bytes written. See `deferred_write_errors`."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                self._file.write(data)
            except OSError as error:
                self.error = error
        return size


@contextlib.contextmanager
def deferred_write_errors(path: str | os.PathLike) -> Iterator[io.RawIOBase]:
    """Opens `path` for writing and yields a file whose write errors (a full disk) reach
    the writer as success: they are raised when the block ends, as the OSError they were.

    For torch's zip writer (`torch.export.save`, `torch.save`), which aborts the process
    when a write fails under it (its destructor finishes the archive and throws again, in
    C++): given this file it finishes, and the error is raised in Python afterwards.
    """
    with open(path, "wb") as file:
        held = _HeldErrorsFile(file)
        yield held
        if held.error is not None:
            raise held.error
