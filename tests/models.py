"""Small real architectures for the tests: transformers models from small configs with random
weights, and the bundled example transformer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from zoo import VOCAB, ZOO  # noqa: F401  (VOCAB is re-exported to the tests)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    n_blocks: int
    kind: str
    causal_lm: bool  # has generate()
    hf: bool = True

    def logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = model(ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    def loss(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = self.logits(model, ids)
        if self.causal_lm or not self.hf:
            logits, targets = logits[:, :-1], ids[:, 1:]
        else:
            targets = ids
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )


def _zoo(name: str) -> Callable[[], nn.Module]:
    """The zoo's builder for an architecture (tests/zoo.py holds the configs)."""
    return next(case for case in ZOO if case.name == name).build


def _example():
    from tiny_transformer import TinyConfig, build_model

    return build_model(0, TinyConfig(vocab_size=VOCAB, d_model=32, d_hidden=64, n_layers=3))


CASES = [
    ModelCase("gpt2", _zoo("gpt2"), 3, "mlp", causal_lm=True),
    ModelCase("llama", _zoo("llama"), 3, "gated", causal_lm=True),
    ModelCase("phi3", _zoo("phi3"), 3, "fused_gated", causal_lm=True),
    ModelCase("bert", _zoo("bert"), 3, "split", causal_lm=False),
    ModelCase("example", _example, 3, "mlp", causal_lm=False, hf=False),
]


def build(case: ModelCase, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build().eval()
