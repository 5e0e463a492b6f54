"""Small real architectures for the tests: transformers models from small configs with random
weights, and the bundled example transformer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

VOCAB = 97


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


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return Phi3ForCausalLM(cfg)


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(cfg)


def _example():
    from tiny_transformer import TinyConfig, build_model

    return build_model(0, TinyConfig(vocab_size=VOCAB, d_model=32, d_hidden=64, n_layers=3))


CASES = [
    ModelCase("gpt2", _gpt2, 3, "mlp", causal_lm=True),
    ModelCase("llama", _llama, 3, "gated", causal_lm=True),
    ModelCase("phi3", _phi3, 3, "fused_gated", causal_lm=True),
    ModelCase("bert", _bert, 3, "split", causal_lm=False),
    ModelCase("example", _example, 3, "mlp", causal_lm=False, hf=False),
]


def build(case: ModelCase, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build().eval()
