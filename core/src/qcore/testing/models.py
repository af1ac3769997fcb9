"""Tiny models of real architectures, built from small configs at test time (nothing is downloaded).

Shared by qcore's own tests and the conformance suite, so every backend is checked on the same models.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaForCausalLM", "LlamaConfig",
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False),
    ),
    "qwen2": (
        "Qwen2ForCausalLM", "Qwen2Config",
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    ),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "opt": (
        "OPTForCausalLM", "OPTConfig",
        dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, word_embed_proj_dim=64),
    ),
    "bert": (
        "BertForMaskedLM", "BertConfig",
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128),
    ),
}  # fmt: skip

INPUT_IDS = [[1, 5, 9, 17, 33, 65, 129, 3]]


def build(arch: str, directory: str | Path, dtype: Any = None, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised tiny ``arch`` model (bf16 by default) to ``directory``; returns the directory."""
    import torch
    import transformers

    class_name, config_name, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).to(dtype or torch.bfloat16)
    model.save_pretrained(directory)
    return Path(directory)


def add_byte_tokenizer(directory: str | Path) -> Path:
    """Save a byte-level tokenizer (one token per byte, 256 in all) beside a tiny model, so any text encodes.

    The tiny models have 256-token vocabularies, so real text can be scored and generated without a download.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins byte-level BPE uses for bytes
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=_stand_in(0), pad_token=_stand_in(0))
    tokenizer.save_pretrained(directory)
    return Path(directory)


@functools.cache
def _byte_values() -> dict[str, int]:
    # GPT-2's table: printable bytes stand for themselves, the others are shifted past 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shift)] = byte
            shift += 1
    return table


def _byte_of(symbol: str) -> int:
    return _byte_values()[symbol]


def _stand_in(byte: int) -> str:
    return next(symbol for symbol, value in _byte_values().items() if value == byte)


def logits(model: Any, input_ids: Any = None) -> Any:
    """The model's logits for a fixed short input, without gradients."""
    import torch

    ids = torch.tensor(INPUT_IDS) if input_ids is None else input_ids
    with torch.no_grad():
        return model(ids.to(model.device)).logits
