"""Writing outputs safely: refuse a path that must not be replaced; write atomically.

Every file or directory memcompile writes (checkpoints, .pt2 programs, plans) is staged
under a temporary name beside its destination and renamed into place, so a failed or
interrupted write leaves nothing half-written. Staged outputs get the permissions a plain
`open()` or `mkdir` would give (the umask's), not the private ones of `tempfile`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import MemcompileError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_existing(
    path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Bad input unless `path` is free or --force. Even with --force, never the current
    directory or one holding it, nor a path that holds one of `inputs` or already exists
    inside one (a new file beside an input's own files is fine)."""
    target = Path(path).resolve()
    if _contains(target, Path.cwd().resolve()):
        raise MemcompileError(
            f"{path} is the current directory or holds it: write the output to a new path"
        )
    for source in inputs:
        source_path = Path(source).resolve()
        if _contains(target, source_path) or (_contains(source_path, target) and target.exists()):
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


def _replace(staged: Path, path: Path) -> None:
    """Move `staged` to `path`, replacing what is there; a directory on either side is
    moved aside first (rename cannot swap it) and put back if the move fails."""
    if not (path.exists() and (path.is_dir() or staged.is_dir())):
        os.replace(staged, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
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
    (the ones still empty), so a failed write leaves no empty folders behind."""
    missing = [p for p in Path(path).absolute().parents if not p.exists()]  # deepest first
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
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
def atomic_file(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields a temporary file path beside `path` (same suffix); renames it to `path` if the
    block succeeds, else removes it. An existing `path` is an error unless `force`."""
    path = Path(path)
    refuse_existing(path, force)
    if path.is_dir():
        raise MemcompileError(f"{path} is a directory: give the path of a file to write")
    with created_parents(path):
        handle, name = tempfile.mkstemp(f"{path.suffix}", f".{path.name}.tmp-", path.parent)
        os.close(handle)
        tmp = Path(name)
        try:
            yield tmp
            tmp.chmod(0o666 & ~_umask())
            _replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
