"""Building the C++ CPU kernels (kernels/native.py) with compilers that fail: one line
saying why, nothing left in the cache, and a build without OpenMP where only that fails."""

from __future__ import annotations

import ctypes
import logging
import shutil
import stat
from pathlib import Path

from memcompile.kernels import native


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_a_failing_compiler_is_one_warning_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    compiler = _script(tmp_path / "broken-c++", 'echo "broken-c++: no such target" >&2\nexit 1\n')
    monkeypatch.setenv("MEMCOMPILE_CACHE", str(cache))
    monkeypatch.setenv("CXX", str(compiler))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.native_library() is None
        assert native.native_library() is None  # not built again, nor said again
    assert "building memcompile's C++ CPU kernels failed: broken-c++: no such target" in caplog.text
    assert len(caplog.records) == 1
    assert list(cache.rglob("*")) == []


def test_a_cache_that_cannot_be_made_says_where_and_what_to_set(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMCOMPILE_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.native_library() is None
    assert "cannot be built in" in caplog.text and "MEMCOMPILE_CACHE" in caplog.text


def test_without_openmp_the_kernels_build_on_one_thread(tmp_path, monkeypatch, caplog):
    """A compiler that refuses -fopenmp (clang without libomp): the second try builds the
    library without it, every source compiled and linked."""
    real = shutil.which("c++") or shutil.which("g++")
    assert real, "a C++17 compiler is on the test machine"
    log = tmp_path / "calls"
    compiler = _script(
        tmp_path / "no-openmp-c++",
        f"""echo "$@" >> {log}
for arg in "$@"; do
  if [ "$arg" = "-fopenmp" ]; then echo "unsupported option '-fopenmp'" >&2; exit 1; fi
done
exec {real} "$@"
""",
    )
    monkeypatch.setenv("MEMCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        library = native.native_library()
    assert library is not None and library.parent == tmp_path / "cache"
    assert "built without OpenMP, so on one thread (-fopenmp failed: unsupported" in caplog.text
    calls = log.read_text().splitlines()
    built = [call for call in calls if "-fopenmp" not in call]
    sources = [source for source in native.SOURCES if source.suffix == ".cc"]
    assert sum(" -c " in call for call in built) == len(sources)
    assert sum("-shared" in call for call in built) == 1
    assert hasattr(ctypes.CDLL(str(library)), "memcompile_top_k")
    assert list((tmp_path / "cache").iterdir()) == [library]  # no objects left behind
