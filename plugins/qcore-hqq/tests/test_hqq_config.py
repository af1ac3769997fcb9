"""qcore-hqq's config and registration: parsing both dict forms, writing transformers' form, range errors, presets,
availability; nothing here loads a model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import qcore
from qcore_hqq.config import HqqConfig, check_module_shape

FLAT_DEFAULT = {"quant_method": "hqq", "nbits": 4, "group_size": 64, "axis": 1}
DYNAMIC = {"self_attn.q_proj": {"nbits": 2, "group_size": 32}, "mlp.down_proj": {"nbits": 8, "group_size": 128}}


def transformers_dict(**kwargs) -> dict:
    """What transformers' own HqqConfig writes into config.json for these arguments."""
    from transformers import HqqConfig as TransformersHqqConfig

    return json.loads(json.dumps(TransformersHqqConfig(**kwargs).to_dict()))


@pytest.mark.parametrize(
    ("flat", "transformers_kwargs"),
    [
        (FLAT_DEFAULT, {}),
        ({"quant_method": "hqq"}, {}),
        ({"quant_method": "hqq", "nbits": 3, "group_size": 128, "axis": 0}, {"nbits": 3, "group_size": 128, "axis": 0}),
        ({"quant_method": "hqq", "nbits": 2, "view_as_float": True}, {"nbits": 2, "view_as_float": True}),
        (
            {"quant_method": "hqq", "skip_modules": ["lm_head", "mlp.down_proj"]},
            {"skip_modules": ["lm_head", "mlp.down_proj"]},
        ),
        ({"quant_method": "hqq", "dynamic_config": DYNAMIC}, {"dynamic_config": DYNAMIC}),
    ],
)
def test_flat_and_nested_forms_parse_alike_and_write_what_transformers_writes(flat, transformers_kwargs):
    nested = transformers_dict(**transformers_kwargs)
    from_flat = qcore.QuantConfig.from_dict(flat)
    from_nested = qcore.QuantConfig.from_dict(nested)
    assert isinstance(from_flat, HqqConfig)
    assert from_flat == from_nested
    assert from_flat.to_dict() == nested
    assert list(from_flat.to_dict()) == list(nested)  # same key order, too
    assert qcore.QuantConfig.from_dict(from_flat.to_dict()) == from_flat


def test_transformers_reads_what_to_dict_writes():
    from transformers.quantizers.auto import AutoQuantizationConfig

    written = HqqConfig.from_dict({"quant_method": "hqq", "nbits": 3, "optimize": False}).to_dict()
    read = AutoQuantizationConfig.from_dict(json.loads(json.dumps(written)))
    assert read.quant_config["weight_quant_params"]["nbits"] == 3
    assert read.quant_config["weight_quant_params"]["optimize"] is False
    assert read.skip_modules == ["lm_head"]


def test_defaults_keep_lm_head_and_follow_hqq():
    config = HqqConfig()
    assert config.skip_modules() == ["lm_head"]
    assert (config.nbits, config.group_size, config.axis, config.optimize) == (4, 64, 1, True)
    assert config.round_zero is True  # hqq's BaseQuantizeConfig rounds zeros for 4-bit only
    assert HqqConfig(nbits=2).round_zero is False
    assert config.quant_config_for("model.layers.0.mlp.up_proj")["weight_quant_params"]["group_size"] == 64


def test_dynamic_config_keys_by_linear_tag_and_leaves_other_tags_unquantized():
    config = HqqConfig.from_dict({"quant_method": "hqq", "dynamic_config": DYNAMIC})
    q_proj = config.quant_config_for("model.layers.7.self_attn.q_proj")["weight_quant_params"]
    assert (q_proj["nbits"], q_proj["group_size"]) == (2, 32)
    assert config.quant_config_for("model.layers.7.mlp.down_proj")["weight_quant_params"]["nbits"] == 8
    assert config.quant_config_for("model.layers.7.self_attn.k_proj") is None


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"nbits": 5}, "nbits"),
        ({"nbits": 16}, "nbits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -64}, "group_size"),
        ({"group_size": 20}, "group_size"),
        ({"axis": 2}, "axis"),
        ({"optimize": "yes"}, "optimize"),
        ({"skip_modules": "lm_head"}, "skip_modules"),
        ({"dynamic_config": {"self_attn.q_proj": {"nbits": 6}}}, "dynamic_config['self_attn.q_proj'].nbits"),
        ({"dynamic_config": {"self_attn.q_proj": {"group_size": 0}}}, "dynamic_config['self_attn.q_proj'].group_size"),
        ({"dynamic_config": {"self_attn.q_proj": {"bits": 4}}}, "bits"),
        ({"dynamic_config": {}}, "dynamic_config"),
        ({"nbits": 8, "dynamic_config": {"self_attn.q_proj": {"nbits": 4}}}, "'nbits' set beside 'dynamic_config'"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_out_of_range_values_raise_config_error_naming_the_field(bad, field):
    with pytest.raises(qcore.ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        qcore.QuantConfig.from_dict({"quant_method": "hqq", **bad})


@pytest.mark.parametrize(
    ("nested_change", "field"),
    [
        (
            {"scale_quant_params": {"nbits": 8, "channel_wise": True, "group_size": 128, "optimize": False}},
            "scale_quant_params",
        ),
        ({"offload_meta": True}, "offload_meta"),
    ],
)
def test_nested_forms_hqq_cannot_serialize_are_refused(nested_change, field):
    nested = transformers_dict()
    nested["quant_config"].update(nested_change)
    with pytest.raises(qcore.ConfigError, match=field):
        qcore.QuantConfig.from_dict(nested)


def test_group_size_must_tile_and_pack_each_module():
    params = HqqConfig(group_size=48).quant_config_for("x")["weight_quant_params"]
    with pytest.raises(qcore.ConfigError, match=r"'group_size'=48 does not divide in_features=64 of module 'x'"):
        check_module_shape(params, "x", 128, 64)
    check_module_shape(params, "x", 128, 96)
    one_group_per_row = HqqConfig(nbits=4, group_size=64).quant_config_for("x")["weight_quant_params"]
    with pytest.raises(qcore.ConfigError, match="4-bit packing needs a multiple of 2"):
        check_module_shape(one_group_per_row, "x", 3, 64)  # three groups cannot pack two per byte


def test_presets_are_registered():
    from qcore.plugins import presets

    found = presets()
    for nbits in (2, 3, 4, 8):
        backend, preset = found[f"hqq-{nbits}bit"]
        assert backend == "hqq"
        assert dict(preset.config) == {"quant_method": "hqq", "nbits": nbits, "group_size": 64, "axis": 1}
        assert preset.trainable and preset.fast_on == ("cuda",) and preset.summary
        assert qcore.QuantConfig.from_dict(preset.config).nbits == nbits


def test_backends_lists_qcore_hqq_available():
    (info,) = [b for b in qcore.backends() if b.distribution == "qcore-hqq"]
    assert info.available, info.reason
    assert info.methods == ("hqq",) and info.name == "hqq"


def test_plugin_import_is_light():
    code = "import sys, qcore, qcore_hqq.plugin; qcore.backends(); print('torch' in sys.modules, 'hqq' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
