"""The ct presets fit the models they are offered for: a Linear its group's ``group_size`` does not divide stays in
full precision, is reported (``model.qcore_fallbacks``, ``qcore estimate``) and is written into ``ignore`` on save,
so compressed-tensors (transformers' reader) and vLLM load its plain weight; ``strict_group_size`` makes it an error.

The tiny Llama has hidden size 128 (attention and gate/up fit groups of 128) and an MLP width of 96 (down_proj does
not).
"""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore.cli import cli
from qcore.testing import build, logits
from qcore_compressed_tensors import CompressedTensorsConfig
from qcore_compressed_tensors.layers import CompressedLinear

DOWN = "model.layers.0.mlp.down_proj"
DOWNS = {f"model.layers.{i}.mlp.down_proj" for i in range(2)}


def preset(name: str) -> dict:
    return qcore.plugins.preset_config(name)


@pytest.fixture(scope="module")
def mlp_96(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("ct-fit") / "llama", hidden_size=128, intermediate_size=96)


@pytest.fixture(scope="module")
def quantized(mlp_96, tmp_path_factory):
    model = qcore.from_pretrained(mlp_96, preset("ct-w4a16"))
    return model, qcore.save_pretrained(model, tmp_path_factory.mktemp("ct-fit") / "out")


def test_a_linear_the_group_size_does_not_divide_stays_in_full_precision(quantized):
    model, _ = quantized
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, CompressedLinear)
    assert set(model.qcore_fallbacks) == DOWNS
    assert model.qcore_fallbacks[DOWN] == (
        "kept in full precision, written into 'ignore' ('group_size'=128 does not divide in_features=96)"
    )


def test_the_saved_config_ignores_them_and_compressed_tensors_agrees(quantized, mlp_96):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    model, saved = quantized
    stored = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert set(stored["ignore"]) == {"lm_head", *DOWNS} and "strict_group_size" not in stored
    # compressed-tensors' own matcher (what transformers and vLLM run) quantizes exactly what qcore did.
    reference = AutoModelForCausalLM.from_pretrained(mlp_96)
    request = {k: v for k, v in stored.items() if k != "quant_method"}
    apply_quantization_config(reference, QuantizationConfig.model_validate(request), show_progress=False)
    expected = {name for name, m in reference.named_modules() if getattr(m, "quantization_scheme", None)}
    assert expected == {name for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    reloaded = qcore.from_pretrained(saved)
    assert type(reloaded.model.layers[0].mlp.down_proj) is torch.nn.Linear and reloaded.qcore_fallbacks == {}
    assert torch.equal(logits(reloaded), logits(model))


def test_strict_group_size_makes_it_an_error(mlp_96):
    with pytest.raises(qcore.ConfigError, match=rf"in_features=96 of module '{DOWN}'.*strict_group_size is set"):
        qcore.from_pretrained(mlp_96, {**preset("ct-w8a16"), "strict_group_size": True})


def test_calibrated_preset_falls_back_the_same_way(mlp_96):
    pytest.importorskip("qcore_gptq")
    calibration = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model = qcore.from_pretrained(mlp_96, preset("ct-w4a16-gptq"), calibration=calibration)
    assert set(model.qcore_fallbacks) == DOWNS and type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear


def test_rules_and_sizes():
    config = CompressedTensorsConfig(config_groups={"W4A16": ["Linear"]}, ignore=["lm_head"])
    assert config.shape_fallback("lm_head", 256, 96) is None  # ignored anyway
    assert "even in_features" in CompressedTensorsConfig(
        config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel"}}}
    ).shape_fallback("m", 64, 33)
    assert config.quantized_nbytes(64, 96, 2) == 64 * 96 * 2  # counted at the fallback's size
    assert CompressedTensorsConfig(config_groups={"W8A8": ["Linear"]}).shape_fallback("m", 64, 96) is None


def test_the_estimate_counts_and_lists_the_fallback(quantized, mlp_96):
    model, _ = quantized
    assert qcore.loading.plan(mlp_96).fallbacks(preset("ct-w4a16")) == model.qcore_fallbacks
    result = CliRunner().invoke(cli, ["estimate", str(mlp_96), "--preset", "ct-w4a16", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["presets"]
    assert row["fallbacks"] == model.qcore_fallbacks
