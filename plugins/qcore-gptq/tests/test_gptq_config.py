"""The gptq and awq configs: every spelling the writing tools use, the dict written back, and the refusals."""

from __future__ import annotations

import json

import pytest
import qcore
from qcore_gptq import AwqConfig, GptqConfig


def test_gptqmodel_config_json_parses(fixture_dir):
    stored = json.loads((fixture_dir("gptq-4bit-g128-768") / "config.json").read_text())["quantization_config"]
    config = qcore.QuantConfig.from_dict(stored)
    assert isinstance(config, GptqConfig)
    assert (config.bits, config.group_size, config.sym, config.desc_act, config.checkpoint_format) == (
        4, 128, True, False, "gptq",
    )  # fmt: skip


def test_autogptq_quantize_config_parses():
    """The keys AutoGPTQ writes to quantize_config.json (and optimum to config.json)."""
    autogptq = {
        "bits": 4, "group_size": 64, "damp_percent": 0.01, "desc_act": True, "static_groups": False, "sym": False,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "is_marlin_format": False,
        "quant_method": "gptq", "checkpoint_format": "GPTQ_V2",
    }  # fmt: skip
    config = GptqConfig.from_dict(autogptq)
    assert (config.group_size, config.desc_act, config.sym, config.checkpoint_format) == (64, True, False, "gptq_v2")


def test_autoawq_config_parses(fixture_dir):
    stored = json.loads((fixture_dir("awq-gemm-4bit-g128-768") / "config.json").read_text())["quantization_config"]
    assert qcore.QuantConfig.from_dict(stored) == AwqConfig(group_size=128, zero_point=True, version="gemm")
    assert AwqConfig.from_dict({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMV"}) == AwqConfig(
        group_size=64, version="gemv"
    )


@pytest.mark.parametrize("config", [GptqConfig(bits=3, group_size=-1, desc_act=True), AwqConfig(version="gemv")])
def test_to_dict_round_trips_with_transformers_keys(config):
    data = config.to_dict()
    assert qcore.QuantConfig.from_dict(data) == config
    if isinstance(config, GptqConfig):
        assert data["format"] == data["checkpoint_format"] == "gptq"
        assert "modules_to_not_convert" not in data  # unset: transformers' GPTQConfig has no such field


@pytest.mark.parametrize(
    "data, message",
    [
        ({"quant_method": "gptq", "bits": 5}, "'bits' must be one of"),
        ({"quant_method": "gptq", "group_size": 0}, "'group_size' must be positive or -1"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "convert other layouts"),
        ({"quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq_v2"}, "disagree"),
        ({"quant_method": "gptq", "damp_percent": 1.5}, "damp_percent"),
        ({"quant_method": "gptq", "lm_head": True}, "lm_head=true"),
        ({"quant_method": "gptq", "pack_dtype": "int16"}, "pack_dtype"),
        ({"quant_method": "gptq", "dynamic": {"-:.*down": {}}}, "dynamic"),
        ({"quant_method": "gptq", "dynamic": 1}, "dynamic.*got 1"),
        ({"quant_method": "gptq", "bitz": 4}, "unknown field"),
        ({"quant_method": "awq", "bits": 3}, "AutoAWQ packs 4-bit only"),
        ({"quant_method": "awq", "version": "marlin"}, "re-export the model as gemm"),
    ],
)
def test_refusals_name_the_field(data, message):
    with pytest.raises(qcore.ConfigError, match=message):
        qcore.QuantConfig.from_dict(data)


def test_sizes_count_codes_scales_zeros_and_g_idx():
    # 4096x4096 at 4 bits, 32 groups: 8 MiB of codes, 32*4096 fp16 scales + 4-bit zeros, 4096 int32 g_idx
    assert GptqConfig().quantized_nbytes(4096, 4096, 2) == 4096 * 4096 // 2 + 32 * 4096 * 20 // 8 + 4 * 4096
    assert AwqConfig().quantized_nbytes(4096, 4096, 2) == 4096 * 4096 // 2 + 32 * 4096 * 20 // 8


def test_backend_lists_both_methods():
    info = next(b for b in qcore.backends() if b.distribution == "qcore-gptq")
    assert set(info.methods) == {"gptq", "awq"} and info.available
