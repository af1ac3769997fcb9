"""The config dict: exactly compressed-tensors', completed as compressed-tensors completes it, written back
unchanged; presets; what is refused; ``ignore`` and ``targets`` matched as compressed-tensors matches them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import qcore
import torch
from qcore_compressed_tensors import CompressedTensorsConfig
from qcore_compressed_tensors.config import PRESET_SCHEMES


def test_a_checkpoints_dict_is_written_back_unchanged(fixtures):
    for name in ("ct-w4a16-sym-pack-g128-768", "ct-w8a16-sym-naive-g16-688", "ct-fp8-dynamic-688"):
        stored = json.loads((fixtures / name / "config.json").read_text())["quantization_config"]
        assert qcore.QuantConfig.from_dict(stored).to_dict() == stored, name


@pytest.mark.parametrize("name", sorted(PRESET_SCHEMES))
def test_presets_are_compressed_tensors_own(name):
    """qcore's torch-free table of presets equals compressed-tensors' ``PRESET_SCHEMES`` (checked here for drift),
    and the format qcore infers is the one ``infer_module_format`` picks for a Linear."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    reference = preset_name_to_scheme(name, ["Linear"])
    config = CompressedTensorsConfig(config_groups={name: ["Linear"]})
    ours = config.config_groups[name]
    dumped = json.loads(reference.model_dump_json())
    assert ours["weights"] == dumped["weights"]
    assert ours["input_activations"] == dumped["input_activations"]
    assert ours["format"] == infer_module_format(torch.nn.Linear, reference).value


def test_a_request_is_completed_as_compressed_tensors_completes_it():
    from compressed_tensors.quantization import QuantizationConfig

    request = {
        "quant_method": "compressed-tensors",
        "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 64}}},
    }
    written = qcore.QuantConfig.from_dict(request).to_dict()
    assert written["quantization_status"] == "compressed" and written["format"] == "pack-quantized"
    assert written["config_groups"]["g"]["weights"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "group_size": 64,
        "strategy": "group",
        "dynamic": False,
    }
    dumped = QuantizationConfig.model_validate(written).model_dump(mode="json")
    for key in ("config_groups", "format", "quantization_status", "ignore"):
        assert dumped[key] == written[key], key
    assert qcore.QuantConfig.from_dict(written) == qcore.QuantConfig.from_dict(request)


REFUSED = {
    "3-bit weights": ({"num_bits": 3, "group_size": 64}, None, r"int 3-bit weights are not served"),
    "static activations": (
        {"num_bits": 8, "strategy": "channel"},
        {"num_bits": 8, "strategy": "token"},
        r"static activation scales",
    ),
    "act-order groups": ({"num_bits": 4, "group_size": 64, "actorder": "group"}, None, r"g_idx"),
    "zero point dtype by name": (
        {"num_bits": 4, "group_size": 64, "symmetric": False, "zp_dtype": "os.system"},
        None,
        r"zp_dtype",
    ),
    "unknown argument": ({"num_bits": 4, "group_size": 64, "bits": 4}, None, r"unknown field\(s\) \['bits'\]"),
    "group without size": ({"num_bits": 4, "strategy": "group"}, None, r"positive group_size"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_settings_are_refused_naming_the_field(case):
    weights, inputs, message = REFUSED[case]
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs}
    with pytest.raises(qcore.ConfigError, match=message):
        qcore.QuantConfig.from_dict({"quant_method": "compressed-tensors", "config_groups": {"g": group}})


def test_kv_cache_and_unknown_presets_are_refused():
    with pytest.raises(qcore.ConfigError, match="kv_cache_scheme"):
        CompressedTensorsConfig(config_groups={"W4A16": ["Linear"]}, kv_cache_scheme={"num_bits": 8})
    with pytest.raises(qcore.ConfigError, match="preset scheme name"):
        CompressedTensorsConfig(config_groups={"NVFP4": ["Linear"]})


def test_strict_group_size_refuses_a_group_size_that_does_not_divide_a_module(llama, one_group):
    weights = {"num_bits": 4, "group_size": 96, "strategy": "group"}
    with pytest.raises(
        qcore.ConfigError,
        match=r"'group_size'=96 does not divide in_features=128 of module 'model\.layers\.0\.self_attn\.q_proj'",
    ):
        qcore.from_pretrained(llama, {**one_group(weights), "strict_group_size": True})


def test_ignore_matches_as_compressed_tensors_does(llama):
    """Exact names and ``re:`` regexes are skipped; a bare suffix is not (compressed-tensors and vLLM match exact
    names only); the modules qcore quantizes are exactly those ``apply_quantization_config`` quantizes."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    config = {
        "quant_method": "compressed-tensors",
        "config_groups": {"W4A16": ["Linear"]},
        "ignore": ["lm_head", "re:.*self_attn\\.q_proj$", "model.layers.1.mlp.up_proj", "k_proj"],
    }
    config["config_groups"] = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32}}}
    model = qcore.from_pretrained(llama, config, dtype=torch.bfloat16)
    ours = {name for name, m in model.named_modules() if type(m).__name__ == "CompressedLinear"}
    reference = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
    request = {k: v for k, v in config.items() if k != "quant_method"}
    apply_quantization_config(reference, QuantizationConfig.model_validate(request), show_progress=False)
    expected = {name for name, m in reference.named_modules() if getattr(m, "quantization_scheme", None)}
    assert ours == expected
    assert "model.layers.0.self_attn.q_proj" not in ours and "model.layers.1.mlp.up_proj" not in ours
    assert "model.layers.0.self_attn.k_proj" in ours


def test_targets_by_name_pick_their_group(llama):
    """Two groups: int8 for the MLP by regex, int4 for every other Linear by class; the more specific match wins."""
    config = {
        "quant_method": "compressed-tensors",
        "ignore": ["lm_head"],
        "config_groups": {
            "attention": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32}},
            "mlp": {"targets": ["re:.*mlp\\..*"], "weights": {"num_bits": 8, "strategy": "channel"}},
        },
    }
    model = qcore.from_pretrained(llama, config, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.down_proj.weight.kind == "int8"
    assert model.model.layers[0].self_attn.o_proj.weight.kind == "int4"
    assert qcore.QuantConfig.from_dict(config).format == "pack-quantized"


def test_estimated_size_is_the_stored_size(llama, one_group, tmp_path):
    weights = {"num_bits": 4, "group_size": 32, "symmetric": False}
    model = qcore.from_pretrained(llama, one_group(weights), dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    config = qcore.QuantConfig.from_dict(one_group(weights))
    assert config.quantized_nbytes(layer.out_features, layer.in_features, 2) == stored


def test_registration_imports_neither_torch_nor_compressed_tensors():
    code = (
        "import sys, qcore; infos = {b.name: b for b in qcore.backends()}; "
        "import qcore_compressed_tensors.plugin; "
        "assert 'compressed-tensors' in infos and infos['compressed-tensors'].available, infos; "
        "assert 'torch' not in sys.modules and 'compressed_tensors' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
