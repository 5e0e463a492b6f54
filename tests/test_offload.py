"""Host-resident value tables (`offload_values`): the model computes the same outputs.

On a CPU-only machine host and device are the same, so this checks the bookkeeping (which
tables move, what stays trainable); the cross-device path runs in
benchmarks/bench_inference.py on a GPU, against device-resident values.
"""

from __future__ import annotations

import pytest
import torch

import memcompile
from memcompile.runtime import offload_values

from models import CASES, VOCAB, build

LLAMA = next(c for c in CASES if c.name == "llama")


def test_offload_moves_each_table_once_and_keeps_outputs():
    for share, tables in ((True, 1), (False, 2)):
        model = memcompile.transform(build(LLAMA), [0, 2], mem_size=256, knn=4, heads=2,
                                     share_values=share)  # fmt: skip
        ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = LLAMA.logits(model, ids)
        assert offload_values(model) == tables
        values = [p for n, p in model.named_parameters() if n.endswith("values")]
        assert len(values) == tables and all(p.device.type == "cpu" for p in values)
        assert all(p.requires_grad for p in values)
        with torch.no_grad():
            assert torch.equal(LLAMA.logits(model, ids), expected)


def test_offloading_tables_not_built_yet_is_refused():
    model = memcompile.transform(build(LLAMA), [1], mem_size=256, knn=4, heads=2, lazy_init=True)
    with pytest.raises(memcompile.MemcompileError, match="call memcompile.runtime.materialize"):
        offload_values(model)
