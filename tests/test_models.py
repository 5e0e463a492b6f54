"""memcompile.transform on real architectures: GPT-2, Llama, Phi-3 (fused gate_up), BERT
(split FFN) from small transformers configs with random weights, and the example model."""

from __future__ import annotations

import pytest
import torch

import memcompile

from models import CASES, VOCAB, build

SMALL = dict(mem_size=256, knn=4, heads=2)
CASE_IDS = [case.name for case in CASES]


def _ids(seed: int, batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_finds_every_block(case):
    blocks = memcompile.find_ffn_blocks(build(case))
    assert [b.index for b in blocks] == list(range(case.n_blocks))
    assert {b.kind for b in blocks} == {case.kind}
    assert all(b.d_model == 32 and b.d_hidden in (64, 128) for b in blocks)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_augment_is_exact(case):
    original = build(case)
    converted = build(case)
    memcompile.transform(converted, layers=[0, 2], mode="augment", **SMALL)
    with torch.no_grad():
        for seed, seq in ((1, 9), (2, 17)):
            ids = _ids(seed, seq=seq)
            assert torch.equal(case.logits(converted, ids), case.logits(original, ids))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_replace_counts_parameters_and_trains(case):
    model = build(case)
    before = dict(model.named_parameters())
    blocks = memcompile.find_ffn_blocks(model)
    ffn_names = {
        name
        for name in before
        for b in (blocks[0], blocks[2])
        if name.startswith(b.path + ".") or (b.exit_path and name.startswith(b.exit_path + "."))
    }
    memcompile.transform(model, layers=[0, 2], **SMALL)
    after = dict(model.named_parameters())

    assert not ffn_names & set(after), "FFN parameters must be gone"
    d, heads, k_dim, n_keys = 32, 2, 32, 16
    per_layer = (d * heads * k_dim + heads * k_dim) + heads * 2 * n_keys * (k_dim // 2)
    per_layer += (d * d + d) * 2  # swilu and out
    shared_values = n_keys**2 * d
    removed = sum(before[name].numel() for name in ffn_names)
    assert sum(p.numel() for p in after.values()) == (
        sum(p.numel() for p in before.values()) - removed + 2 * per_layer + shared_values
    )
    assert after["memcompile_pool.values"].shape == (n_keys**2, d)

    model.train()
    ids = _ids(3, batch=4, seq=12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = case.loss(model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.memcompile_pool.values.grad is not None
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("case", [c for c in CASES if c.causal_lm], ids=lambda c: c.name)
def test_causal_lms_still_generate(case):
    prompt = _ids(4, batch=1, seq=5)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    original = build(case)
    expected = original.generate(prompt, **kwargs)

    augmented = memcompile.transform(build(case), layers=[1], mode="augment", **SMALL)
    assert torch.equal(augmented.generate(prompt, **kwargs), expected)

    replaced = memcompile.transform(build(case), layers=[0, 1, 2], **SMALL)
    tokens = replaced.generate(prompt, **kwargs)
    assert tokens.shape == expected.shape and torch.equal(tokens[:, :5], prompt)


@pytest.mark.parametrize("name", ["example", "llama"])
def test_converted_model_exports_and_compiles_without_graph_breaks(name):
    case = next(c for c in CASES if c.name == name)
    model = _LogitsOnly(memcompile.transform(build(case), layers=[0, 2], **SMALL), case.hf)
    ids = _ids(5)
    with torch.no_grad():
        expected = model(ids)

        program = torch.export.export(model, (ids,))
        ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.memcompile.pk_topk.default) == 2
        assert ops.count(torch.ops.memcompile.bag.default) == 2
        torch.testing.assert_close(program.module()(ids), expected)

        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids), expected)


class _LogitsOnly(torch.nn.Module):
    """ids -> logits, without an HF model's cache objects in the output."""

    def __init__(self, model: torch.nn.Module, hf: bool) -> None:
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits if self.hf else self.model(ids)
