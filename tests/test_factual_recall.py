"""examples/factual_recall.py: its FLOPs count against torch's own, its knowledge base, and
the quick run, in which the memory model must recall more facts than the dense one."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import factual_recall as fr  # noqa: E402

import memcompile  # noqa: E402

TINY = replace(fr.QUICK, subjects=60, alphabet=10, relations=3, objects=20, steps=4, evals=2)


def test_knowledge_base_is_facts_of_two_token_subjects():
    inputs, objects = fr.knowledge_base(TINY)
    assert inputs.shape == (TINY.facts, 3) and objects.shape == (TINY.facts,)
    a, r = TINY.alphabet, TINY.relations
    assert inputs[:, :2].max() < a and (inputs[:, 2] >= a).all() and (inputs[:, 2] < a + r).all()
    assert (objects >= a + r).all() and (objects < TINY.vocab).all()
    subjects = {tuple(row) for row in inputs[:, :2].tolist()}
    assert len(subjects) == TINY.subjects  # distinct subjects, each with every relation
    assert len({tuple(row) for row in inputs.tolist()}) == TINY.facts
    again, same = fr.knowledge_base(TINY)
    assert torch.equal(again, inputs) and torch.equal(same, objects)


@pytest.mark.parametrize("d_hidden", [None, 300])
def test_dense_flops_per_token_match_torch_flop_counter(d_hidden, one_thread):
    # Train mode and the math attention kernel: the counter sees neither the fused fast path
    # nn.MultiheadAttention takes in eval mode nor the fused CPU attention kernel. (Dropout
    # is 0, so the computation is the same.)
    model = fr.build(fr.QUICK, "dense", d_hidden).train()
    ids = fr.knowledge_base(TINY)[0][:8]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)
    assert fr.flops_per_token(model) * ids.numel() == counter.get_total_flops()


def test_memory_model_and_its_equal_flops_dense_twin(one_thread):
    memory = fr.build(fr.QUICK, "memory")
    blocks = memcompile.find_ffn_blocks(memory)
    assert [b.index for b in blocks] == [0, 2]  # block 1, the middle one, holds the memory
    assert isinstance(memory.blocks[1].mlp, memcompile.MemoryLayer)
    dense = fr.build(fr.QUICK, "dense")
    ffn = 2 * 2 * fr.QUICK.d_model * fr.QUICK.d_hidden
    layer = memory.blocks[1].mlp
    assert fr.flops_per_token(memory) - fr.flops_per_token(dense) + ffn == (
        2 * layer.d_in * layer.heads * layer.k_dim  # query
        + 2 * layer.heads * layer.n_keys * layer.k_dim  # both halves of the sub-keys
        + layer.heads * layer.knn**2  # candidate sums
        + 2 * layer.heads * layer.knn * layer.v_dim  # bag
        + 2 * 2 * layer.d_in * layer.v_dim  # swilu, out
    )
    target = fr.flops_per_token(memory)
    wide = fr.widen_to_match(fr.QUICK, target)
    assert fr.flops_per_token(fr.build(fr.QUICK, "dense-wide", wide)) >= target
    assert fr.flops_per_token(fr.build(fr.QUICK, "dense-wide", wide - 1)) < target


def test_quick_run_memory_recalls_more_than_dense(tmp_path):
    out = tmp_path / "recall.json"
    result = fr.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    runs = {r["name"]: r for r in result["models"]}
    assert list(runs) == ["dense", "memory", "dense-wide"]
    for run in runs.values():
        assert [p["step"] for p in run["curve"]][-1] == fr.QUICK.steps
        assert all(0.0 <= p["recall"] <= 1.0 for p in run["curve"])
    assert runs["memory"]["recall"] > runs["dense"]["recall"]
    assert runs["memory"]["value_params"] == 256**2 * fr.QUICK.d_model
    wide, memory = runs["dense-wide"]["flops_per_token"], runs["memory"]["flops_per_token"]
    assert memory <= wide < memory * 1.01
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
