"""``qcore convert model.gguf OUT --preset bnb-nf4``: a GGUF file streamed into a bitsandbytes nf4 checkpoint.

Each nf4 layer must be bitsandbytes' own nf4 quantization of the GGUF layer's dequantized weight, and the result a
checkpoint transformers' bitsandbytes loader reads into the same model. Skipped where qcore-bnb is not installed.
"""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore.cli import cli
from qcore.convert import dequantize_module


def test_qcore_convert_writes_a_gguf_file_as_bnb_nf4_that_transformers_loads(gguf_file, logits_of, tmp_path):
    pytest.importorskip("qcore_bnb")
    import bitsandbytes.functional as bnb_functional
    from transformers import AutoModelForCausalLM

    path, out = gguf_file("llama", "Q4_0"), tmp_path / "nf4"
    result = CliRunner().invoke(cli, ["convert", str(path), str(out), "--preset", "bnb-nf4"])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "bitsandbytes" and stored["bnb_4bit_quant_type"] == "nf4"

    source, converted = qcore.from_pretrained(path), qcore.from_pretrained(out)
    names = [name for name, module in converted.named_modules() if type(module).__name__ == "Linear4bit"]
    assert len(names) == 14
    for name in names:
        weight = dequantize_module(source, name, converted.dtype)["weight"]
        expected = bnb_functional.dequantize_4bit(*bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4"))
        assert torch.equal(dequantize_module(converted, name, converted.dtype)["weight"], expected), name

    reference = AutoModelForCausalLM.from_pretrained(out, dtype=converted.dtype)
    assert type(reference.get_submodule(names[0])).__name__ == "Linear4bit"
    assert torch.equal(logits_of(reference), logits_of(converted))


def test_qcore_quantize_takes_a_gguf_file_and_summarizes_what_it_read(gguf_file, logits_of, tmp_path):
    # A .gguf file is pre-quantized: `qcore quantize` saves it with its own method (another method is `qcore convert`).
    path, out = gguf_file("llama", "Q4_0"), tmp_path / "quantized"
    result = CliRunner().invoke(cli, ["quantize", str(path), str(out), "--preset", "gguf-q4_0"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gguf"
    # The summary's sizes come from the reader the load used (the .gguf file's), not from a safetensors reader.
    assert "saved" in result.output and out.name in result.output
    assert torch.equal(logits_of(qcore.from_pretrained(out)), logits_of(qcore.from_pretrained(path)))
