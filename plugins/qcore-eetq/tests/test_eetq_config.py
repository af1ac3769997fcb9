"""EetqConfig against transformers' EetqConfig, the registration qcore.backends() shows, and the torch-free import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import qcore
from qcore_eetq import EetqConfig


def test_defaults_and_dict_match_transformers():
    from transformers import EetqConfig as TransformersEetqConfig

    ours = qcore.QuantConfig.from_dict({"quant_method": "eetq"})
    assert isinstance(ours, EetqConfig)
    assert ours.to_dict() == TransformersEetqConfig().to_dict()
    theirs = TransformersEetqConfig(modules_to_not_convert=["lm_head", "model.layers.0.mlp"])
    assert qcore.QuantConfig.from_dict(theirs.to_dict()).to_dict() == theirs.to_dict()


def test_weights_other_than_int8_are_refused_naming_the_field():
    with pytest.raises(qcore.ConfigError, match="'weights' must be 'int8'"):
        qcore.QuantConfig.from_dict({"quant_method": "eetq", "weights": "int4"})


def test_skip_list_is_modules_to_not_convert_and_defaults_to_the_core():
    assert EetqConfig().skip_modules() is None
    assert EetqConfig(modules_to_not_convert=["q_proj"]).skip_modules() == ["q_proj"]


def test_quantized_nbytes_is_the_bytes_a_layer_holds():
    import torch
    from qcore_eetq.linear import EetqLinear, quantize_weight

    layer = EetqLinear(48, 80, bias=False, dtype=torch.bfloat16, transposed_checkpoint=False)
    for name, value in quantize_weight(
        layer, "m", torch.randn(80, 48), torch.bfloat16, torch.device("cpu"), "x"
    ).items():
        setattr(layer, name, value)
    held = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert EetqConfig().quantized_nbytes(80, 48, 2) == held


def test_registered_backend_is_available_with_its_preset():
    [info] = [b for b in qcore.backends() if b.name == "eetq"]
    assert info.available and info.methods == ("eetq",) and info.presets == ("eetq-int8",)
    from qcore.plugins import preset_config, presets

    preset = presets()["eetq-int8"][1]
    assert preset.fast_on == ("cuda", "cpu") and not preset.trainable
    assert isinstance(qcore.QuantConfig.from_dict(preset_config("eetq-int8")), EetqConfig)


def test_entry_point_module_imports_neither_torch_nor_eetq():
    code = "import sys, qcore_eetq.plugin; print(sorted({'torch', 'EETQ', 'eetq'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
