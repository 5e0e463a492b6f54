"""The zoo: one small config per transformers architecture memcompile must convert."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

VOCAB = 97
D, H, LAYERS = 32, 64, 3


@dataclass(frozen=True)
class ZooCase:
    name: str
    config_class: str
    model_class: str
    config: dict
    kind: str
    causal_lm: bool = False
    indices: tuple = (0, 1, 2)
    inputs: str = "ids"  # "ids" | "pixels" | "seq2seq" | "audio" (seq2seq from mel features)
    extra: dict = field(default_factory=dict)

    def build(self, seed: int = 0) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**self.config)
        return getattr(transformers, self.model_class)(config).eval()

    def example_inputs(self, seed: int = 0, batch: int = 2, seq: int = 9) -> dict:
        generator = torch.Generator().manual_seed(seed)
        if self.inputs == "pixels":
            return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
        ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
        if self.inputs == "seq2seq":
            return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
        if self.inputs == "audio":  # 16 mel bins, 2 * max_source_positions frames
            features = torch.randn(batch, 16, 32, generator=generator)
            return {"input_features": features, "decoder_input_ids": ids[:, :5]}
        return {"input_ids": ids}

    def output(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


DECODER = dict(
    num_hidden_layers=LAYERS,
    hidden_size=D,
    intermediate_size=H,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
# BART-style encoder-decoders (BART, Whisper): two layers on each side.
ENCODER_DECODER = dict(
    encoder_layers=2,
    decoder_layers=2,
    d_model=D,
    encoder_ffn_dim=H,
    decoder_ffn_dim=H,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    vocab_size=VOCAB,
)

ZOO = [
    ZooCase(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_layer=LAYERS, n_embd=D, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
        "mlp",
        causal_lm=True,
    ),
    ZooCase("llama", "LlamaConfig", "LlamaForCausalLM", DECODER, "gated", causal_lm=True),
    ZooCase("mistral", "MistralConfig", "MistralForCausalLM", DECODER, "gated", causal_lm=True),
    ZooCase("qwen2", "Qwen2Config", "Qwen2ForCausalLM", DECODER, "gated", causal_lm=True),
    # xIELU, an activation module with two learnable scalars
    ZooCase("apertus", "ApertusConfig", "ApertusForCausalLM", DECODER, "mlp", causal_lm=True),
    ZooCase(
        "gemma",
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(DECODER, head_dim=8),
        "gated",
        causal_lm=True,
    ),
    ZooCase(
        "phi3",
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(DECODER, num_key_value_heads=4),
        "fused_gated",
        causal_lm=True,
    ),
    ZooCase(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            num_hidden_layers=LAYERS,
            hidden_size=D,
            ffn_dim=H,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=D,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        ),
        "mlp",
        causal_lm=True,
    ),
    ZooCase(
        "gpt_neox",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            num_hidden_layers=LAYERS,
            hidden_size=D,
            intermediate_size=H,
            num_attention_heads=4,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "mlp",
        causal_lm=True,
    ),
    ZooCase(
        "falcon",
        "FalconConfig",
        "FalconForCausalLM",
        dict(
            num_hidden_layers=LAYERS,
            hidden_size=D,
            num_attention_heads=4,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "mlp",
        causal_lm=True,
    ),
    ZooCase(
        "bloom",
        "BloomConfig",
        "BloomForCausalLM",
        dict(
            n_layer=LAYERS,
            hidden_size=D,
            n_head=4,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "mlp",
        causal_lm=True,
    ),
    ZooCase(
        "bert",
        "BertConfig",
        "BertForMaskedLM",
        dict(
            num_hidden_layers=LAYERS,
            hidden_size=D,
            intermediate_size=H,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        "split",
    ),
    ZooCase(
        "t5",
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            num_layers=2,
            num_decoder_layers=2,
            d_model=D,
            d_ff=H,
            d_kv=8,
            num_heads=4,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        "mlp",
        indices=("encoder.0", "encoder.1", "decoder.0", "decoder.1"),
        inputs="seq2seq",
    ),
    ZooCase(  # its encoder layer branches on the dtype (float16 clamping): still found
        "bart",
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            ENCODER_DECODER,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "mlp",
        indices=("encoder.0", "encoder.1", "decoder.0", "decoder.1"),
        inputs="seq2seq",
    ),
    ZooCase(
        "whisper",
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            ENCODER_DECODER,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        "mlp",
        indices=("encoder.0", "encoder.1", "decoder.0", "decoder.1"),
        inputs="audio",
    ),
    ZooCase(
        "vit",
        "ViTConfig",
        "ViTModel",
        dict(
            num_hidden_layers=LAYERS,
            hidden_size=D,
            intermediate_size=H,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
        ),
        "mlp",
        inputs="pixels",
    ),
]
