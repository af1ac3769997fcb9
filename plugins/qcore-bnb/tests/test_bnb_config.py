"""BnbConfig against transformers' BitsAndBytesConfig: same fields, defaults and dict; range errors naming the
field; exact sizes; the registered backend and presets; a torch-free entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import qcore
import torch
from qcore_bnb import BnbConfig
from qcore_bnb.plugin import PRESETS
from transformers import BitsAndBytesConfig

FIELD_SETS = [
    {"load_in_4bit": True},
    {"load_in_8bit": True},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
    {"load_in_4bit": True, "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "bfloat16"},
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "llm_int8_skip_modules": ["lm_head", "mlp"]},
    {
        "load_in_8bit": True, "llm_int8_threshold": 3.5, "llm_int8_has_fp16_weight": True,
        "llm_int8_enable_fp32_cpu_offload": True,
    },
]  # fmt: skip


def transformers_dict(**fields) -> dict:
    """What transformers writes into config.json for these fields."""
    return json.loads(json.dumps(BitsAndBytesConfig(**fields).to_dict()))


@pytest.mark.parametrize("fields", FIELD_SETS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_same_dict_means_the_same_in_both_libraries(fields):
    written_by_transformers = transformers_dict(**fields)
    config = BnbConfig.from_dict({"quant_method": "bitsandbytes", **fields})

    assert config.to_dict() == written_by_transformers
    assert BnbConfig.from_dict(written_by_transformers).to_dict() == written_by_transformers
    assert json.loads(json.dumps(BitsAndBytesConfig.from_dict(config.to_dict()).to_dict())) == written_by_transformers


def test_dispatched_from_the_base_class_and_accepts_torch_dtypes():
    config = qcore.QuantConfig.from_dict(
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": torch.bfloat16,
         "bnb_4bit_quant_storage": "torch.float16"}
    )  # fmt: skip
    assert isinstance(config, BnbConfig)
    assert (config.bnb_4bit_compute_dtype, config.bnb_4bit_quant_storage) == ("bfloat16", "float16")


def test_defaults_are_transformers_defaults():
    config = BnbConfig(load_in_4bit=True)
    assert config.compute_dtype == "float32" and config.bnb_4bit_quant_type == "fp4"
    assert config.llm_int8_threshold == 6.0 and config.skip_modules() is None
    assert BnbConfig(load_in_4bit=True, llm_int8_skip_modules=["mlp"]).skip_modules() == ["mlp"]
    # An unset compute dtype and "float32" write the same config, so the round trip compares equal.
    assert (
        BnbConfig.from_dict(config.to_dict())
        == config
        != BnbConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float16")
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit and load_in_8bit are both true"),
        ({}, "neither load_in_4bit nor load_in_8bit"),
        ({"_load_in_4bit": True}, "neither load_in_4bit nor load_in_8bit"),
        ({"load_in_4bit": True, "_load_in_4bit": False}, "load_in_4bit=True contradicts _load_in_4bit=False"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "'bnb_4bit_quant_type' must be one of"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}, "'bnb_4bit_compute_dtype' must be one of"),
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "float8"}, "'bnb_4bit_quant_storage' must be one of"),
        ({"load_in_4bit": True, "bnb_4bit_blocksize": 100}, "'bnb_4bit_blocksize' must be one of"),
        ({"load_in_8bit": True, "llm_int8_threshold": -1.0}, "'llm_int8_threshold' must be >= 0"),
        ({"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}, "'llm_int8_skip_modules' must be"),
        ({"load_in_8bit": True, "bnb_4bit_group_size": 64}, "unknown field(s) ['bnb_4bit_group_size']"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(qcore.ConfigError) as error:
        BnbConfig.from_dict({"quant_method": "bitsandbytes", **fields})
    assert message in str(error.value)


def test_blocksize_is_written_only_when_not_the_default_and_transformers_accepts_it():
    assert "bnb_4bit_blocksize" not in BnbConfig(load_in_4bit=True).to_dict()
    written = BnbConfig.from_dict({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_blocksize": 128})
    assert written.to_dict()["bnb_4bit_blocksize"] == 128
    assert BnbConfig.from_dict(written.to_dict()).bnb_4bit_blocksize == 128
    assert BitsAndBytesConfig.from_dict(written.to_dict()).load_in_4bit


def test_user_compute_dtype_overrides_only_when_given():
    stored = BnbConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
    user = BnbConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float16", bnb_4bit_use_double_quant=True)

    merged = stored.with_loading_attributes(user)
    assert merged.bnb_4bit_compute_dtype == "float16"
    assert (merged.bnb_4bit_quant_type, merged.bnb_4bit_use_double_quant) == ("nf4", False)
    assert stored.with_loading_attributes(BnbConfig(load_in_4bit=True)).bnb_4bit_compute_dtype == "bfloat16"


@pytest.mark.parametrize(
    "fields",
    [
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"load_in_4bit": True, "bnb_4bit_use_double_quant": True},
        {"load_in_4bit": True, "bnb_4bit_quant_storage": "float32", "bnb_4bit_blocksize": 128},
        {"load_in_8bit": True},
        {"load_in_8bit": True, "llm_int8_has_fp16_weight": True},
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", [(96, 64), (100, 36), (512, 600)], ids=str)
def test_quantized_nbytes_is_what_bitsandbytes_stores(fields, shape):
    import bitsandbytes as bnb

    config = BnbConfig.from_dict({"quant_method": "bitsandbytes", **fields})
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    if config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=False, has_fp16_weights=config.llm_int8_has_fp16_weight
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=config.llm_int8_has_fp16_weight)
    else:
        storage = getattr(torch, config.bnb_4bit_quant_storage)
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type, quant_storage=storage,
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=config.bnb_4bit_blocksize, quant_type=config.bnb_4bit_quant_type,
            compress_statistics=config.bnb_4bit_use_double_quant, quant_storage=storage, module=layer,
        )  # fmt: skip
    stored = sum(t.numel() * t.element_size() for t in layer.to("cpu").state_dict().values())

    estimate = config.quantized_nbytes(out_features, in_features, weight.element_size())
    # Exact but for the digits of the double-quant offset, a float printed into the packed quant-state JSON.
    assert abs(estimate - stored) <= (8 if config.bnb_4bit_use_double_quant else 0)


def test_backend_and_presets_are_registered():
    (info,) = [b for b in qcore.backends() if b.distribution == "qcore-bnb"]
    assert info.name == "bnb" and info.methods == ("bitsandbytes",) and info.available
    assert info.presets == ("bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-int8")
    for preset in PRESETS:
        config = qcore.QuantConfig.from_dict(preset.config)
        assert isinstance(config, BnbConfig) and preset.summary
        assert preset.trainable and preset.fast_on == ("cuda",) and not preset.needs_calibration
    short_names = [qcore.QuantConfig.from_dict(p.config).short_name() for p in PRESETS]
    assert short_names == [
        "bitsandbytes nf4", "bitsandbytes nf4 double-quant", "bitsandbytes fp4", "bitsandbytes int8"
    ]  # fmt: skip


def test_entry_point_imports_neither_torch_nor_bitsandbytes():
    code = (
        "import sys, qcore, qcore_bnb.plugin; qcore.backends(); "
        "print(sorted({'torch', 'bitsandbytes', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
