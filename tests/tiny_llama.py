"""A tiny random LLaMA for fast tests: the default model's tokenizer, two small layers.

It has every linear layer a LoRA adapter may target, so engine, adapter and trainer
tests run on it in milliseconds per step; the real default model covers integration.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def build_tiny_llama(folder: Path, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                     trainable: bool = False) -> Path:
    """Save a randomly initialised 2-layer LLaMA and ``tokenizer`` into ``folder``.

    ``trainable`` makes a variant a LoRA can fit in a few hundred steps (trainer tests):
    with transformers' default init (std 0.02) the logits are near-uniform and the final
    norm bounds the hidden state, so a LoRA cannot sharpen them much; and SmolLM2's pad
    token is its EOS, whose embedding row ``padding_idx`` zeroes, which (embeddings being
    tied) pins the EOS logit at 0. The variant uses std 0.3 and no pad token."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None if trainable else tokenizer.pad_token_id,
        initializer_range=0.3 if trainable else 0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
