"""Tiny GGUF files of real architectures, written at test time as llama.cpp writes them.

:func:`write` builds a randomly initialised tiny transformers model and converts it the
way llama.cpp's ``convert_hf_to_gguf.py`` does: tensor names through gguf's own ``get_tensor_name_map`` (the
converter's ``map_tensor_name``), Llama q/k rows permuted with the converter's ``LlamaModel.permute``, Gemma norms
stored as ``w + 1``, GPT-2's Conv1D weights transposed, metadata under the converter's keys, a byte-level BPE
vocabulary, and every 2-D tensor (embeddings and head included) in ``type_name`` through ``gguf.quants.quantize``.
The K-quants, which the gguf package cannot write, get blocks made by hand: random bytes with finite half-precision
scales. Shared by the tests (through conftest.py's fixtures) and the README check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: arch -> (transformers class, config class, config, llama.cpp architecture, general.name).
SPECS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False), "llama", "tiny"),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(tie_word_embeddings=False), "llama", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False), "qwen2", "tiny"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True), "qwen3", "tiny"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(tie_word_embeddings=False), "phi3", "tiny"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=64, sliding_window=64), "gemma2", "tiny"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=256, n_layer=2, n_head=4), "gpt2", "tiny"),
}
# Every width a multiple of 256, the K-quants' block. Where transformers' GGUF config mapping leaves a field out
# (Qwen3's head_dim, GPT-2's n_positions), the tiny model keeps the config class's default, which is what
# transformers' own gguf_file= load builds.
SHAPE = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128,
)  # fmt: skip
#: 16 merges: a vocabulary of 272 rows, so a tied table runs the CPU int4 kernel (rows in multiples of 16) with
#: full 64-row blocks of its layout and a 16-row tail.
MERGES = ["Ġ t", "h e", "i n", "Ġt he", "Ġ a", "o n", "e r", "a n", "Ġ s", "r e", "Ġ w", "o r", "e n", "Ġ c", "a t",
          "Ġ o"]  # fmt: skip
VOCAB = 256 + len(MERGES)
HAND_MADE = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: Byte offsets of the half-precision scales in each hand-made block type (the rest of a block is any bytes).
SCALE_BYTES = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}


def hf_model(arch: str, seed: int = 0):
    import transformers

    class_name, config_name, extra, _, _ = SPECS[arch]
    shape = {} if arch == "gpt2" else SHAPE
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape, **extra
    )
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config).float().eval()


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def hand_made_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    start, stop = SCALE_BYTES[type_name]
    scales = rng.uniform(-1e-4, 1e-4, (raw.shape[0], (stop - start) // 2)).astype(np.float16)
    scales[scales == 0] = 1e-5  # a zero d with a nonzero dmin is a constant block (see below)
    raw[:, start:stop] = scales.view(np.uint8)
    if type_name in ("Q4_K", "Q5_K"):
        # No 6-bit sub-block scale of 0 (a constant sub-block, which llama.cpp's quantizer makes only for constant
        # data): such a Q4_K tensor has no integer form and would stay on the dequantize path.
        raw[:, 4:8] |= 1
        raw[:, 12:16] |= 1
    return raw.reshape(rows, -1)


def write(arch: str, type_name: str, path: Path, model=None) -> Path:
    """Write ``model`` (default: :func:`hf_model`) as a GGUF file at ``path`` with every 2-D tensor in ``type_name``."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model = model if model is not None else hf_model(arch)
    config, (_, _, _, gguf_arch, name) = model.config, SPECS[arch]
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(name)
    layers = config.num_hidden_layers
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma2":
        writer.add_sliding_window(config.sliding_window)
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    alphabet = list(bytes_to_unicode().values())
    writer.add_token_list(alphabet + [merge.replace(" ", "") for merge in MERGES])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()], layers)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    rng = np.random.default_rng(0)
    qtype = gguf.GGMLQuantizationType[type_name]
    for hf_name, tensor in model.state_dict().items():
        if hf_name in tied or hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        data = tensor.float().numpy()
        if gguf_arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, config.num_attention_heads, config.num_attention_heads)
        if gguf_arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, config.num_attention_heads, config.num_key_value_heads)
        if arch == "gemma2" and hf_name.endswith("norm.weight"):
            data = data + 1
        if arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        if data.ndim != 2 or type_name == "F32":
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif type_name in HAND_MADE:
            writer.add_tensor(gguf_name, hand_made_blocks(type_name, *data.shape, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
