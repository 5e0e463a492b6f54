"""The zoo: `memcompile convert` then `memcompile.load` on transformers architectures built
from small configs with random weights. Augment mode is exact, replace mode trains, causal
LMs still generate (the same tokens in augment mode)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from zoo import ZOO

import memcompile
from memcompile.cli import main

SMALL = ["--mem-size", "256", "--knn", "4", "--heads", "2", "--quiet"]
IDS = [case.name for case in ZOO]


def _convert(source, out, layers, mode):
    args = ["convert", str(source), "--layers", ",".join(map(str, layers)), "--mode", mode]
    result = CliRunner().invoke(main, [*args, *SMALL, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return memcompile.load(out)


def _loss(case, model, inputs):
    out = case.output(model, inputs)
    if case.inputs == "pixels":
        return out.pow(2).mean()
    seq2seq = case.inputs in ("seq2seq", "audio")
    targets = inputs["decoder_input_ids"] if seq2seq else inputs["input_ids"]
    if case.causal_lm:
        out, targets = out[:, :-1], targets[:, 1:]
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("case", ZOO, ids=IDS)
def test_zoo_convert_load_augment_exact_replace_trains(case, tmp_path):
    original = case.build()
    source = tmp_path / "hf"
    original.save_pretrained(source)
    blocks = memcompile.find_ffn_blocks(original)
    assert tuple(b.index for b in blocks) == case.indices
    assert {b.kind for b in blocks} == {case.kind}
    chosen = [case.indices[0], case.indices[-1]]

    augmented = _convert(source, tmp_path / "augment", chosen, "augment")
    inputs = case.example_inputs(seed=1)
    with torch.no_grad():
        assert torch.equal(case.output(augmented, inputs), case.output(original, inputs))

    replaced = _convert(source, tmp_path / "replace", chosen, "replace")
    again = memcompile.load(tmp_path / "replace")
    with torch.no_grad():
        assert torch.equal(case.output(replaced, inputs), case.output(again, inputs))
    replaced.train()
    batch = case.example_inputs(seed=2, batch=4, seq=12)
    optimizer = torch.optim.AdamW(replaced.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = _loss(case, replaced, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

    if case.causal_lm:
        prompt = case.example_inputs(seed=3, batch=1, seq=5)["input_ids"]
        options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = original.generate(prompt, **options)
        assert torch.equal(augmented.generate(prompt, **options), expected)
        assert replaced.eval().generate(prompt, **options).shape == expected.shape
