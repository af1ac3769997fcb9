"""Shared fixtures: tiny checkpoints of real architectures (saved once), transformers' reference loads, and the
helpers every test file uses to compare models and checkpoints.

Llama (nn.Linear, untied lm_head), GPT-2 (transformers' Conv1D, tied embeddings) and OPT (Linear with biases). The
repository runs pytest with ``--import-mode=importlib``, so helpers are fixtures rather than an importable module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ARCHITECTURES = ("llama", "gpt2", "opt")
#: The configs the parity tests compare, as the field dicts a user passes (transformers' names for them).
METHODS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}


def _tiny_model(architecture: str):
    import transformers

    torch.manual_seed(0)
    if architecture == "llama":
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    if architecture == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Architecture -> directory of a full-precision (float32) checkpoint."""
    paths = {}
    for architecture in ARCHITECTURES:
        paths[architecture] = tmp_path_factory.mktemp(architecture)
        _tiny_model(architecture).save_pretrained(paths[architecture])
    return paths


@pytest.fixture(params=ARCHITECTURES)
def architecture(request) -> str:
    return request.param


@pytest.fixture(params=list(METHODS))
def method(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def bnb_dict():
    """The qcore ``quantization_config`` dict for a key of :data:`METHODS`, with extra fields laid over it."""

    def bnb_dict(method: str, **extra) -> dict:
        return {"quant_method": "bitsandbytes", **METHODS[method], **extra}

    return bnb_dict


@pytest.fixture(scope="session")
def reference_model():
    """The model transformers' own bitsandbytes path loads, for a METHODS key or a field dict."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def reference_model(path, method: str | dict, dtype: torch.dtype, **kwargs):
        fields = METHODS[method] if isinstance(method, str) else method
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**fields), dtype=dtype, **kwargs
        )

    return reference_model


@pytest.fixture(scope="session")
def logits_of():
    """The logits of a model on a fixed batch of two 8-token sequences."""
    input_ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))

    def logits_of(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids.to(model.device)).logits.cpu()

    return logits_of


@pytest.fixture(scope="session")
def saved_tensors():
    """Every tensor of a saved checkpoint: name -> (dtype, shape), read from the safetensors headers."""
    from safetensors import safe_open

    def saved_tensors(directory) -> dict[str, tuple[str, tuple[int, ...]]]:
        found = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                names = handle.keys()
                for name in names:
                    view = handle.get_slice(name)
                    found[name] = (view.get_dtype(), tuple(view.get_shape()))
        return found

    return saved_tensors


@pytest.fixture(scope="session")
def saved_quantization_config():
    """The ``quantization_config`` a saved checkpoint's config.json carries."""

    def saved_quantization_config(directory) -> dict:
        return json.loads((Path(directory) / "config.json").read_text())["quantization_config"]

    return saved_quantization_config
