"""The gptq presets fit the models they are offered for: a Linear that group_size 128 does not divide stays in full
precision, is reported (``model.qcore_fallbacks``, ``qcore estimate``), and the saved checkpoint stays a standard
GPTQ one: one group size, the full-precision Linears named in ``modules_to_not_convert`` with their plain weights.

The tiny Llama has hidden size 64 (attention and gate/up take 64 inputs) and an MLP width of 128 (down_proj fits).
"""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore.cli import cli
from qcore.testing import logits
from qcore_gptq import GptqConfig
from qcore_gptq.layers import GptqLinear
from safetensors.torch import load_file

GPTQ_4BIT = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}
#: The Linears with 64 input features, which groups of 128 do not fit.
NARROW = [f"self_attn.{name}_proj" for name in "qkvo"] + ["mlp.gate_proj", "mlp.up_proj"]


@pytest.fixture(scope="module")
def quantized(checkpoints, calibration_ids, tmp_path_factory):
    model = qcore.from_pretrained(checkpoints["llama"], GPTQ_4BIT, calibration=calibration_ids)
    return model, qcore.save_pretrained(model, tmp_path_factory.mktemp("gptq-fallback") / "out")


def test_a_linear_the_group_size_does_not_divide_stays_in_full_precision(quantized):
    model, _ = quantized
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, GptqLinear) and layer.mlp.down_proj.layout.group_size == 128
    assert type(layer.self_attn.q_proj) is torch.nn.Linear
    expected = {f"model.layers.{i}.{name}" for i in range(2) for name in NARROW}
    assert set(model.qcore_fallbacks) == expected
    assert model.qcore_fallbacks["model.layers.0.self_attn.q_proj"] == (
        "kept in full precision ('group_size'=128 does not divide in_features=64)"
    )


def test_the_saved_checkpoint_names_them_in_modules_to_not_convert(quantized):
    model, saved = quantized
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["group_size"] == 128 and "strict_group_size" not in config
    assert set(config["modules_to_not_convert"]) == {"lm_head", *model.qcore_fallbacks}
    tensors = load_file(saved / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj."
    assert q_proj + "weight" in tensors and q_proj + "qweight" not in tensors
    assert "model.layers.0.mlp.down_proj.qweight" in tensors
    reloaded = qcore.from_pretrained(saved)
    assert type(reloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear and reloaded.qcore_fallbacks == {}
    assert torch.equal(logits(reloaded), logits(model))
    # The reload's own config is the same standard one: saving it again changes nothing.
    again = qcore.save_pretrained(reloaded, saved.parent / "again")
    assert json.loads((again / "config.json").read_text())["quantization_config"] == config


def test_strict_group_size_makes_it_an_error(checkpoints, calibration_ids):
    with pytest.raises(qcore.ConfigError, match=r"in_features=64 of module 'model\.layers\.0\.self_attn\.q_proj'"):
        qcore.from_pretrained(
            checkpoints["llama"], {**GPTQ_4BIT, "strict_group_size": True}, calibration=calibration_ids
        )


def test_packing_widths_fall_back_too():
    config = GptqConfig(bits=4, group_size=-1)
    assert config.shape_fallback("m", 64, 96) is None
    assert "not a multiple of 32" in config.shape_fallback("m", 64, 48)
    assert "whole int32 words of qzeros" in GptqConfig(bits=3, group_size=32).shape_fallback("m", 36, 64)


def test_the_estimate_counts_and_lists_the_fallback(quantized, checkpoints):
    model, _ = quantized
    assert qcore.loading.plan(checkpoints["llama"]).fallbacks(GPTQ_4BIT) == model.qcore_fallbacks
    assert GptqConfig().quantized_nbytes(64, 64, 4) == 64 * 64 * 4
    result = CliRunner().invoke(cli, ["estimate", str(checkpoints["llama"]), "--preset", "gptq-4bit", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["presets"]
    assert row["fallbacks"] == model.qcore_fallbacks


def test_the_quantize_summary_reports_the_fallback(checkpoints, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", str(checkpoints["llama"]), str(out), "--preset", "gptq-8bit"]
    # The tiny model has no tokenizer: calibration comes as a file of token ids.
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([list(range(1, 33))] * 2))
    result = CliRunner().invoke(cli, [*args, "--calibration", str(ids)])
    assert result.exit_code == 0, result.output
    assert "12 module(s) did not fit the settings" in result.stdout
