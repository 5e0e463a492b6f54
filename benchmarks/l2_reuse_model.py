"""A model, not a measurement: the share of the row pass's output-gradient gathers that an
LRU cache of a given size would serve, at the 1.3B-like config, in two row orders.

It replays one column block of the bag backward's short-row pass (triton_rows.py) as one
stream, in the order the kernel reaches the rows: its 4,096 programs (256 rows each) run in
waves of 660 (5 an SM), program p taking rows p, p + 4096, ..., so at each step a wave is at
660 consecutive rows of the list. Per row: its value row read (2 KB), its pairs'
output-gradient rows (2 KB each) and its gradient row written (2 KB). A gather hits when the
bytes touched since that token's previous gather are fewer than the cache: counting all of
them (a lower bound on the hit rate), or the streamed rows plus the distinct gathered rows
expected in between. Also with the gradient stores, or all streamed rows, bypassing the
cache (what eviction priorities or an L2 window aim at). The GPU runs programs concurrently
and H100's 50 MB L2 is two halves, so 25 and 50 MB bracket it. Written to interpret the next
H100 run (GPU_NOTES.md, eleventh session), not to set defaults.

    python benchmarks/l2_reuse_model.py
"""

from __future__ import annotations

import numpy as np

TOKENS, PICKS, ROWS = 16384, 128, 1024 * 1024
ROW_BYTES = 2048  # one row's 1024-column block in bf16
CACHES_MB = (25, 50)
ROWS_A_PROGRAM, RESIDENT_PROGRAMS = 256, 660  # pass_blocks' default; 5 programs an SM, 132 SMs


def kernel_order() -> np.ndarray:
    """List positions in the order the short-row kernel reaches them (waves in lock step)."""
    programs = -(-ROWS // ROWS_A_PROGRAM)
    program = np.arange(programs)[None, :]
    step = np.arange(ROWS_A_PROGRAM)[:, None]
    position = program + programs * step
    when = ((program // RESIDENT_PROGRAMS) * ROWS_A_PROGRAM + step) * programs + program
    position = position.ravel()[np.argsort(when.ravel(), kind="stable")]
    return position[position < ROWS]


def hit_rates(row_order, counts, offsets, token_of_pair, streamed_rows=2) -> dict[str, float]:
    """Hit rates of the gathers when the rows are walked in `row_order`, with
    `streamed_rows` rows a row through the cache (1: the gradient stores bypass it, as
    `PassShape.l2_hints` means them to)."""
    per_row = counts[row_order]
    firsts = np.repeat(offsets[row_order] - np.concatenate([[0], np.cumsum(per_row)[:-1]]),
                       per_row)  # fmt: skip
    tokens = token_of_pair[firsts + np.arange(per_row.sum())]
    gather = np.arange(tokens.size)
    slot = np.repeat(np.arange(row_order.size), per_row)
    # The value (and gradient) rows of the earlier rows, and this row's value row.
    streamed = (streamed_rows * slot + 1) * ROW_BYTES
    by_token = np.lexsort((gather, tokens))
    repeat = np.concatenate([[False], tokens[by_token][1:] == tokens[by_token][:-1]])
    previous = np.full(tokens.size, -1)
    previous[by_token[repeat]] = by_token[np.flatnonzero(repeat) - 1]
    again = previous >= 0
    streamed_between = streamed[again] - streamed[previous[again]]
    gathers_between = gather[again] - previous[again]
    distinct = TOKENS * (1 - np.exp(-gathers_between / TOKENS)) * ROW_BYTES

    def share(hits) -> float:
        return round(float(hits.sum()) / tokens.size, 3)

    rates = {}
    for mb in CACHES_MB:
        cache = mb << 20
        rates[f"{mb} MB, all bytes"] = share(streamed_between + gathers_between * ROW_BYTES < cache)
        rates[f"{mb} MB, distinct"] = share(streamed_between + distinct < cache)
        rates[f"{mb} MB, streamed rows bypass"] = share(distinct < cache)
    return rates


def main() -> None:
    rng = np.random.default_rng(0)
    indices = rng.integers(0, ROWS, size=TOKENS * PICKS)
    order = np.argsort(indices, kind="stable")  # the reverse index: by row, tokens in order
    counts = np.bincount(indices, minlength=ROWS)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    token_of_pair = order // PICKS
    first_token = np.where(counts > 0, token_of_pair[np.minimum(offsets[:-1], order.size - 1)],
                           TOKENS)  # fmt: skip
    orders = {"by row (default)": np.arange(ROWS),
              "by first token": np.argsort(first_token, kind="stable")}  # fmt: skip
    print(f"first pairs: {np.count_nonzero(counts) / order.size:.1%} of the pairs")
    reached = kernel_order()
    for name, row_order in orders.items():
        row_order = row_order[reached]
        for streamed_rows, stores in ((2, ""), (1, ", gradient stores bypassing")):
            rates = hit_rates(row_order, counts, offsets, token_of_pair, streamed_rows)
            print(f"{name}{stores}: {rates}")


if __name__ == "__main__":
    main()
