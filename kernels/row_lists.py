"""The lists the row pass (triton_rows.py) walks, built on the device with no host
synchronisation: the reverse index of (token, pick) pairs by row, the order rows are walked
in, the rows past a size (for the long-row kernel) and the chunks of split rows."""

from __future__ import annotations

import torch

MAX_BLOCK_P = 16  # the row pass's widest pair block: its lanes may read past a row's end


def reverse_index(indices: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): flat (token, pick) positions sorted by row, stably, and each row's
    [offsets[r], offsets[r+1]) range in `order`; int32 below 2**31 pairs (fewer registers
    in the row pass). No host synchronisation."""
    flat = indices.reshape(-1)
    # int32 with room for the lane offsets past a row's end (first + lanes).
    narrow = flat.numel() < 2**31 - 4 * MAX_BLOCK_P
    # Row ids below 2**31 sort as int32 keys: half the radix passes of int64.
    keys = flat.to(torch.int32) if n_rows < 2**31 else flat
    sorted_rows, order = torch.sort(keys, stable=True)
    bounds = torch.arange(n_rows + 1, device=flat.device, dtype=sorted_rows.dtype)
    offsets = torch.searchsorted(sorted_rows, bounds, out_int32=narrow)
    return (order.to(torch.int32) if narrow else order), offsets


def rows_by_first_token(order: torch.Tensor, offsets: torch.Tensor, picks: int) -> torch.Tensor:
    """Every table row (int64), ordered by the first token that picked it, rows no token
    picked last. A row's pairs are listed in token order (`reverse_index` sorts stably), so
    its first pair holds its first token. No host synchronisation."""
    n_pairs = order.numel()
    first_pair = order[offsets[:-1].clamp_max(n_pairs - 1)].to(torch.int64)
    picked = offsets[1:] > offsets[:-1]
    token = torch.where(picked, first_pair // picks, n_pairs // picks)
    narrow = token.to(torch.int32) if n_pairs < 2**31 else token  # half the radix passes
    return torch.sort(narrow, stable=True).indices


def rows_between(starts: torch.Tensor, stops: torch.Tensor, low: int, high: int | None,
                  n_pairs: int) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """(entries, count, capacity): the list entries with more than `low` pairs (and at most
    `high`), first in `entries` (int32), and their count as a one-element device tensor:
    no host synchronisation. At most n_pairs // (low + 1) rows can have more than `low`
    pairs: the capacity."""
    capacity = min(starts.shape[0], n_pairs // (low + 1))
    counts = stops - starts
    chosen = counts > low if high is None else (counts > low) & (counts <= high)
    rank = torch.cumsum(chosen, 0, dtype=torch.int32)
    # The other entries all land on one spare slot past the capacity, never read.
    target = torch.where(chosen, rank - 1, capacity).to(torch.int64)
    entries = torch.empty(capacity + 1, dtype=torch.int32, device=starts.device)
    every = torch.arange(starts.shape[0], dtype=torch.int32, device=starts.device)
    entries.scatter_(0, target, every)
    return entries, rank[-1:], capacity


def chunks(starts: torch.Tensor, stops: torch.Tensor, split: int, n_pairs: int):
    """The rows of more than `split` pairs and their chunks of `split` pairs, listed on the
    device (no host synchronisation), or None when no row can have that many: (rows, their
    count, each row's first chunk, its chunk count, each chunk's list entry, first pair and
    end, the chunks' count). Lists are sized for the worst case; entries past the counts are
    never read."""
    rows, n_rows, row_capacity = rows_between(starts, stops, split, None, n_pairs)
    if not row_capacity:
        return None
    rows = rows[:row_capacity]
    device = starts.device
    live = torch.arange(row_capacity, device=device) < n_rows
    slots = torch.where(live, rows, 0).to(torch.int64)  # past the count: uninitialised
    count = torch.where(live, (stops[slots] - starts[slots] + split - 1) // split, 0)
    ends = torch.cumsum(count, 0, dtype=torch.int64)
    begin = ends - count
    chunk = torch.arange(n_pairs // split + row_capacity, device=device, dtype=torch.int64)
    owner = torch.searchsorted(ends, chunk, right=True).clamp_max(row_capacity - 1)
    first = starts[slots[owner]] + (chunk - begin[owner]) * split
    last = torch.minimum(first + split, stops[slots[owner]])
    return rows, n_rows, begin, count, slots[owner], first, last, ends[-1:]
