"""Against optimum-quanto itself: qcore's codes, scales and shifts are quanto's (``quantize`` + ``freeze``) bit for
bit for every weight type, quanto's own ``safetensors + quantization map`` checkpoint loads with the logits of qcore's
own quantization, the kernels stay within their documented bound of the dequantized weights, and nothing builds
quanto's C++ extension (conftest.py fails any test that tries)."""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from qcore.testing import logits
from safetensors.torch import load_file, save_file

pytest.importorskip("optimum.quanto")
from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantization_map, quantize  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

QTYPES = {"int8": qint8, "int4": qint4, "int2": qint2, "float8": qfloat8}


@pytest.fixture(scope="module", params=list(QTYPES))
def quanto_pair(request, llama, tmp_path_factory):
    """(weight type, quanto's own checkpoint directory: config.json, model.safetensors, quanto_qmap.json)."""
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
    quantize(model, weights=QTYPES[request.param], exclude=["lm_head"])
    freeze(model)
    directory = tmp_path_factory.mktemp("quanto") / request.param
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "quanto_qmap.json").write_text(json.dumps(quantization_map(model)))
    return request.param, directory


def test_codes_and_scales_are_quantos_bit_for_bit(quanto_pair, llama, tmp_path):
    kind, directory = quanto_pair
    model = qcore.from_pretrained(llama, {"quant_method": "quanto", "weights": kind}, dtype=torch.bfloat16)
    qcore.save_pretrained(model, tmp_path / "qcore")
    ours, theirs = load_file(tmp_path / "qcore" / "model.safetensors"), load_file(directory / "model.safetensors")
    from qcore_quanto.layers import unpack

    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        out_features, in_features = model.get_submodule(name).out_features, model.get_submodule(name).in_features
        scale = theirs[f"{name}.weight._scale"]
        assert torch.equal(ours[f"{name}.weight_scale"].flatten(), scale.flatten()), name
        if kind in ("int8", "float8"):
            assert torch.equal(
                ours[f"{name}.weight_codes"].view(torch.uint8), theirs[f"{name}.weight._data"].view(torch.uint8)
            )
            continue
        assert torch.equal(ours[f"{name}.weight_shift"].flatten(), theirs[f"{name}.weight._shift"].flatten()), name
        bits = {"int4": 4, "int2": 2}[kind]
        packed = theirs[f"{name}.weight._data._data"]  # quanto packs along the grouped codes' first dimension
        rows = scale.numel()
        codes = torch.cat([(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(8 // bits)])[:rows]
        assert torch.equal(unpack(ours[f"{name}.weight_packed"], bits), codes.reshape(out_features, in_features))


def test_quantos_own_checkpoint_loads_with_qcores_logits(quanto_pair, llama):
    from qcore_quanto import quanto_checkpoint

    kind, directory = quanto_pair
    loaded = qcore.from_pretrained(quanto_checkpoint(directory))
    fresh = qcore.from_pretrained(llama, {"quant_method": "quanto", "weights": kind}, dtype=torch.bfloat16)
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QuantoLinear"
    assert torch.equal(logits(loaded), logits(fresh))


@pytest.mark.parametrize("kind", list(QTYPES))
def test_each_kernel_is_within_its_bound_of_the_dequantized_weight(llama, kind):
    model = qcore.from_pretrained(llama, {"quant_method": "quanto", "weights": kind}, dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = x.float() @ layer.weight.dequantize(torch.float32).T
    assert ((layer(x).double() - exact.double()).abs() <= layer.weight.error_bound(x)).all()


def test_group_size_sets_the_scales_and_a_misfit_stays_full_precision(llama):
    model = qcore.from_pretrained(llama, {"quant_method": "quanto", "weights": "int4", "group_size": 32})
    assert model.model.layers[0].self_attn.q_proj.weight.scale.shape == (128, 4)
    odd = qcore.from_pretrained(llama, {"quant_method": "quanto", "weights": "int4", "group_size": 96})
    assert type(odd.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # 96 divides neither 128 nor 256
    assert "does not divide in_features=128" in odd.qcore_fallbacks["model.layers.0.self_attn.q_proj"]


def test_the_saved_config_maps_each_module_and_transformers_refuses_it(llama, tmp_path):
    model = qcore.from_pretrained(llama, {"quant_method": "quanto", "weights": "int4"}, dtype=torch.bfloat16)
    qcore.save_pretrained(model, tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert stored["weights"]["model.layers.0.self_attn.q_proj"] == "int4" and "lm_head" not in stored["weights"]
    assert torch.equal(logits(qcore.from_pretrained(tmp_path / "out")), logits(model))
    with pytest.raises(ValueError, match="Only support weights in"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"weights": "int3"}, "must be one of"),
        ({"weights": "int8", "activations": "int8"}, "'activations' must be null"),
        ({"weights": {"model.layers.0.self_attn.q_proj": "__import__('os')"}}, "must be one of"),
        ({"weights": "int4", "group_size": 33}, "positive even"),
    ],
)
def test_config_errors_name_the_field(config, match):
    with pytest.raises(qcore.ConfigError, match=match):
        qcore.QuantConfig.from_dict({"quant_method": "quanto", **config})


def test_a_malformed_quantization_map_is_a_checkpoint_error(quanto_pair, tmp_path):
    import shutil

    from qcore_quanto import quanto_checkpoint

    _, directory = quanto_pair
    case = shutil.copytree(directory, tmp_path / "case")
    qmap = json.loads((case / "quanto_qmap.json").read_text())
    qmap["model.layers.0.self_attn.q_proj"]["weights"] = "__import__('os')"
    (case / "quanto_qmap.json").write_text(json.dumps(qmap))
    with pytest.raises(qcore.CheckpointError, match="has weights"):
        quanto_checkpoint(case)
