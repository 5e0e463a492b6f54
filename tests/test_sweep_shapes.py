"""benchmarks/gpu_timing.sweep_shapes, the loop of every block-shape sweep of a GPU run:
the kernels' own choice is timed first, each shape's result is compared with it, a shape
that fails in any step (also in the comparison, where a GPU's asynchronous errors surface)
gets an error row and the sweep goes on, and the fastest shape is named only among those
that computed the default's result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_timing import DEFAULT, hooks_restored, problems, sweep_shapes  # noqa: E402

sys.path.pop(0)


class Kernel:
    """A stand-in kernel whose block shape is a module-level hook, as in kernels/."""

    choice = (0,)  # the kernels' own choice


OUTPUTS = {  # what each shape computes
    (0,): torch.arange(4.0),
    (1,): torch.arange(4.0),
    (2,): torch.arange(4.0) + 1,  # a wrong result
    (3,): torch.arange(5.0),  # a wrong size: fails in the comparison
    (5,): torch.arange(4.0) + 1e-4,  # within bf16's rounding
}
TIMES = {(0,): 3.0, (1,): 2.0, (2,): 0.5, (3,): 0.1, (5,): 1.0}


def run():
    if Kernel.choice == (4,):
        raise RuntimeError("out of resources")
    return OUTPUTS[Kernel.choice]


def install(shape):
    Kernel.choice = shape


def timer(fn):
    return TIMES.get(Kernel.choice, 9.0)


def test_each_shape_is_compared_with_the_default_and_failures_do_not_end_the_sweep():
    with hooks_restored(Kernel, "choice"):
        rows, best = sweep_shapes([(1,), (2,), (3,), (4,), (5,)], "BLOCK", install, run, timer)
    assert Kernel.choice == (0,)  # restored
    assert [r["shape"] for r in rows] == [DEFAULT, "BLOCK=1", "BLOCK=2", "BLOCK=3", "BLOCK=4",
                                          "BLOCK=5"]  # fmt: skip
    by_shape = {r["shape"]: r for r in rows}
    assert by_shape[DEFAULT]["same_result"] and by_shape["BLOCK=1"]["same_result"]
    assert by_shape["BLOCK=2"]["same_result"] is False
    assert "error" in by_shape["BLOCK=3"] and "ms" not in by_shape["BLOCK=3"]
    assert by_shape["BLOCK=4"]["error"].startswith("RuntimeError: out of resources")
    assert by_shape["BLOCK=5"]["same_result"]
    # BLOCK=2 and 3 were faster but wrong: the fastest right one is BLOCK=5, 1.0 of 3.0 ms
    assert best == {"shape": "BLOCK=5", "ms": 1.0, "of_default": pytest.approx(0.333)}
    assert [r["shape"] for r in problems(rows)] == ["BLOCK=2", "BLOCK=3", "BLOCK=4"]


def test_a_default_that_fails_ends_the_sweep_with_its_error():
    with hooks_restored(Kernel, "choice"):
        Kernel.choice = (4,)
        rows, best = sweep_shapes([(1,), (2,)], "BLOCK", install, run, timer)
    assert best is None and len(rows) == 1 and rows[0]["shape"] == DEFAULT
    assert "out of resources" in rows[0]["error"]


def test_annotations_are_added_to_the_shapes_rows():
    with hooks_restored(Kernel, "choice"):
        rows, _ = sweep_shapes([(1,)], "BLOCK", install, run, timer,
                               annotate=lambda shape: {"note": shape[0]})  # fmt: skip
    assert "note" not in rows[0] and rows[1]["note"] == 1
