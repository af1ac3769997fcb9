"""Tiny models of real architectures, built from small configs at test time (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

ARCHITECTURES = {
    "llama": (
        "LlamaForCausalLM",
        transformers.LlamaConfig,
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False),
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        transformers.Qwen2Config,
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        transformers.GPT2Config,
        dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    ),
    "opt": (
        "OPTForCausalLM",
        transformers.OPTConfig,
        dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, word_embed_proj_dim=64),
    ),
    "bert": (
        "BertForMaskedLM",
        transformers.BertConfig,
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128),
    ),
}  # fmt: skip

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 3]])


def build(arch: str, directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny ``arch`` model in ``dtype`` to ``directory``; returns the directory."""
    class_name, config_class, kwargs = ARCHITECTURES[arch]
    config = config_class(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).to(dtype)
    model.save_pretrained(directory)
    return directory


def logits(model, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids.to(model.device)).logits
