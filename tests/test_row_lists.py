"""The row pass's device-side lists (kernels/row_lists.py) against brute force."""

from __future__ import annotations

import torch

from memcompile.kernels.row_lists import reverse_index, rows_by_first_token


def test_rows_by_first_token_orders_rows_by_the_first_token_that_picked_them():
    g = torch.Generator().manual_seed(0)
    n_tokens, picks, n_rows = 9, 5, 40
    indices = torch.randint(0, n_rows, (n_tokens, picks), generator=g)
    indices[3, :] = 7  # a token picking one row several times
    order, offsets = reverse_index(indices, n_rows)
    got = rows_by_first_token(order, offsets, picks)
    first = {}
    for token in range(n_tokens):
        for row in indices[token].tolist():
            first.setdefault(row, token)
    # Rows by first token, ties by row (a stable sort of rows in row order); unpicked last.
    want = sorted(range(n_rows), key=lambda r: (first.get(r, n_tokens), r))
    assert got.tolist() == want
    assert got.dtype == torch.int64


def test_reverse_index_lists_each_rows_pairs_in_token_order():
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 12, (7, 4), generator=g)
    order, offsets = reverse_index(indices, 12)
    flat = indices.reshape(-1).tolist()
    for row in range(12):
        pairs = order[offsets[row] : offsets[row + 1]].tolist()
        assert pairs == [p for p, r in enumerate(flat) if r == row]
