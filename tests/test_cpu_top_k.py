"""The C++ top-k that every CPU kernel uses (kernels/cpu_kernels.h: a ranking from a
bisected threshold, and nth_element where scores are NaN or tie by the hundred) against a
brute force: every index sorted by (NaN first, higher score, lower index), the order of
torch.topk's values and of ONNX TopK's ties."""

from __future__ import annotations

import math

import pytest
import torch

from memcompile.kernels import cpu


def brute_force_top_k(row: list[float], k: int) -> tuple[list[float], list[int]]:
    order = sorted(
        range(len(row)),
        key=lambda i: (not math.isnan(row[i]), -row[i] if not math.isnan(row[i]) else 0.0, i),
    )
    return [row[i] for i in order[:k]], order[:k]


def native_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = cpu._native()
    assert kernels, "a C++17 compiler is on the test machine"
    scores = scores.contiguous()
    rows, n = scores.shape
    best = torch.empty(rows, k)
    best_ids = torch.empty(rows, k, dtype=torch.int64)
    kernels["memcompile_top_k"](scores.data_ptr(), rows, n, k, best.data_ptr(), best_ids.data_ptr())
    return best, best_ids


def _rows(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(16, n, generator=g)
    if kind == "normal":
        return normal
    if kind == "integer ties":  # ~20 distinct values: ties at every threshold
        return (normal * 3).round()
    if kind == "all equal":
        return torch.zeros(16, n)
    if kind == "infinities":
        scores = normal.clone()
        scores[:, ::7] = -math.inf
        scores[:8, 3::11] = math.inf
        return scores
    if kind == "extremes":  # near float32's largest: the threshold's bisection stays finite
        return normal.sign() * 3e38 * torch.rand(16, n, generator=g)
    if kind == "nan":
        scores = normal.clone()
        scores[::3, 5] = math.nan
        scores[1, 9::13] = math.nan
        return scores
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["normal", "integer ties", "all equal", "infinities", "extremes", "nan"]
)
@pytest.mark.parametrize(
    "n,k", [(512, 32), (256, 32), (64, 32), (100, 8), (1000, 64), (40, 1), (300, 65)]
)
def test_top_k_matches_a_brute_force(kind, n, k):
    scores = _rows(kind, n, seed=n + k)
    best, best_ids = native_top_k(scores, k)
    for r in range(scores.shape[0]):
        values, ids = brute_force_top_k(scores[r].tolist(), k)
        assert best_ids[r].tolist() == ids, (kind, r)
        torch.testing.assert_close(best[r], torch.tensor(values), rtol=0, atol=0, equal_nan=True)
