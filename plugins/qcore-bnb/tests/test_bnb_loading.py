"""Loading with qcore-bnb beyond the method matrix: skip lists, the compute-dtype override of a pre-quantized load,
double-quant storage, the settings transformers has no parity test for (block size, storage dtype, 16-bit int8
weights, fp32 CPU offload), what the loaded model tells the ecosystem, and every refusal."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import qcore
import torch
from qcore.checkpoint import CheckpointReader
from qcore_bnb.config import BnbConfig
from qcore_bnb.environment import REQUIREMENT, check_devices, check_offload


def bnb_layers(model) -> list[str]:
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.fixture(scope="module")
def nf4_checkpoint(checkpoints, bnb_dict, tmp_path_factory):
    """A Llama checkpoint quantized by qcore to nf4 with bfloat16 compute, and the model that was saved."""
    model = qcore.from_pretrained(checkpoints["llama"], bnb_dict("nf4"), dtype=torch.bfloat16)
    return qcore.save_pretrained(model, tmp_path_factory.mktemp("nf4") / "saved"), model


def test_default_skips_are_transformers_and_a_user_list_replaces_them(checkpoints, reference_model, logits_of):
    default = qcore.from_pretrained(checkpoints["gpt2"], {"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert "lm_head" not in bnb_layers(default) and len(bnb_layers(default)) == 8

    # Patterns match as transformers matches them: a suffix ("down_proj") or a prefix up to a dot ("model.layers.1").
    fields = {"load_in_4bit": True, "llm_int8_skip_modules": ["down_proj", "model.layers.1"]}
    reference = reference_model(checkpoints["llama"], fields, torch.float32)
    model = qcore.from_pretrained(checkpoints["llama"], {"quant_method": "bitsandbytes", **fields})
    assert bnb_layers(model) == bnb_layers(reference)
    assert "lm_head" in bnb_layers(model) and "model.layers.0.mlp.up_proj" in bnb_layers(model)
    assert not any("down_proj" in name or "layers.1." in name for name in bnb_layers(model))
    assert torch.equal(logits_of(model), logits_of(reference))


def test_double_quant_stores_uint8_scales_with_nested_statistics(checkpoints, bnb_dict, tmp_path, saved_tensors):
    saved = qcore.save_pretrained(qcore.from_pretrained(checkpoints["llama"], bnb_dict("nf4-dq")), tmp_path / "dq")
    tensors = saved_tensors(saved)
    prefix = "model.layers.0.mlp.up_proj.weight"
    assert tensors[f"{prefix}.absmax"] == ("U8", (128 * 64 // 64,))
    assert tensors[f"{prefix}.nested_absmax"][0] == "F32" and tensors[f"{prefix}.nested_quant_map"] == ("F32", (256,))
    assert f"{prefix}.quant_state.bitsandbytes__nf4" in tensors
    plain = saved_tensors(
        qcore.save_pretrained(qcore.from_pretrained(checkpoints["llama"], bnb_dict("nf4")), tmp_path / "nf4")
    )
    assert plain[f"{prefix}.absmax"] == ("F32", (128,)) and f"{prefix}.nested_absmax" not in plain


def test_user_compute_dtype_overrides_the_checkpoint(nf4_checkpoint, logits_of):
    from transformers import AutoModelForCausalLM

    saved, _ = nf4_checkpoint
    user = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": "float16"}
    model = qcore.from_pretrained(saved, user, dtype=torch.bfloat16)
    layers = [model.get_submodule(name) for name in bnb_layers(model)]
    assert {layer.compute_dtype for layer in layers} == {torch.float16}
    assert model.config.quantization_config["bnb_4bit_compute_dtype"] == "float16"
    assert model.config.quantization_config["bnb_4bit_quant_type"] == "nf4"

    # transformers has no such override: set the same compute dtype on its layers by hand and compare.
    reference = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    for name in bnb_layers(reference):
        reference.get_submodule(name).compute_dtype = torch.float16
    assert torch.equal(logits_of(model), logits_of(reference))


def test_a_user_config_without_compute_dtype_keeps_the_checkpoints(nf4_checkpoint, logits_of):
    saved, original = nf4_checkpoint
    model = qcore.from_pretrained(saved, {"quant_method": "bitsandbytes", "load_in_4bit": True}, dtype=torch.bfloat16)
    assert {model.get_submodule(n).compute_dtype for n in bnb_layers(model)} == {torch.bfloat16}
    assert torch.equal(logits_of(model), logits_of(original))


@pytest.mark.parametrize(
    "extra",
    [
        {"bnb_4bit_quant_storage": "bfloat16"},
        {"bnb_4bit_quant_storage": "float32", "bnb_4bit_compute_dtype": "float16"},
        {"llm_int8_enable_fp32_cpu_offload": True},
    ],
    ids=str,
)
def test_more_4bit_settings_match_transformers(checkpoints, extra, bnb_dict, reference_model, logits_of):
    fields = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", **extra}
    reference = reference_model(checkpoints["opt"], fields, torch.bfloat16)
    model = qcore.from_pretrained(checkpoints["opt"], {"quant_method": "bitsandbytes", **fields}, dtype=torch.bfloat16)
    # fp32 CPU offload on a CPU-only map keeps every module unquantized, in transformers as here.
    assert bnb_layers(model) == bnb_layers(reference)
    assert bool(bnb_layers(model)) != model.qcore_kernels["qcore-bnb"].startswith("none")
    assert torch.equal(logits_of(model), logits_of(reference))


@pytest.mark.parametrize(
    ("architecture", "fields"),
    [
        ("gpt2", {"load_in_8bit": True, "llm_int8_has_fp16_weight": True}),
        ("llama", {"load_in_8bit": True, "llm_int8_threshold": 0.0, "llm_int8_skip_modules": ["q_proj"]}),
        ("wide-llama", {"load_in_4bit": True, "bnb_4bit_blocksize": 128, "bnb_4bit_use_double_quant": True}),
    ],
    ids=str,
)
def test_settings_round_trip_through_qcore(checkpoints, architecture, fields, tmp_path, logits_of):
    config = {"quant_method": "bitsandbytes", **fields}
    source = wide("llama", tmp_path) if architecture == "wide-llama" else checkpoints[architecture]
    model = qcore.from_pretrained(source, config, dtype=torch.bfloat16)
    expected = logits_of(model)
    reloaded = qcore.from_pretrained(qcore.save_pretrained(model, tmp_path / "saved"), dtype=torch.bfloat16)
    assert torch.equal(logits_of(reloaded), expected)
    assert reloaded.config.quantization_config == BnbConfig.from_dict(config).to_dict()


def wide(arch: str, tmp_path):
    """A tiny model whose every Linear is at least 256 wide: bitsandbytes 0.50's CPU 4-bit kernel (used by
    transformers and qcore alike) cannot run a layer with fewer input features than the block size."""
    from qcore.testing.models import build

    widths = {"gpt2": {"n_embd": 256}, "llama": {"hidden_size": 256, "intermediate_size": 512}}[arch]
    return build(arch, tmp_path / f"wide-{arch}", **widths)


def test_a_larger_block_size_loads_in_transformers(bnb_dict, tmp_path, logits_of):
    from transformers import AutoModelForCausalLM

    model = qcore.from_pretrained(wide("gpt2", tmp_path), bnb_dict("nf4", bnb_4bit_blocksize=256), dtype=torch.bfloat16)
    assert {model.get_submodule(n).weight.quant_state.blocksize for n in bnb_layers(model)} == {256}
    saved = qcore.save_pretrained(model, tmp_path / "saved")
    reference = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    assert torch.equal(logits_of(reference), logits_of(model))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_loaded_model_is_flagged_and_reports_its_kernel(checkpoints, method, bnb_dict):
    model = qcore.from_pretrained(checkpoints["llama"], bnb_dict(method))
    flag = "is_loaded_in_8bit" if method == "int8" else "is_loaded_in_4bit"
    other = "is_loaded_in_4bit" if method == "int8" else "is_loaded_in_8bit"
    assert getattr(model, flag) is True and not getattr(model, other, False)
    assert model.is_quantized and model.quantization_method == "bitsandbytes"
    kernel = model.qcore_kernels["qcore-bnb"]
    assert kernel.startswith(f"bitsandbytes {method}") and "cpu:" in kernel


def test_full_precision_weights_under_a_bnb_config_are_refused(checkpoints, tmp_path):
    broken = shutil.copytree(checkpoints["llama"], tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = BnbConfig(load_in_4bit=True).to_dict()
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.CheckpointError, match=r"has no 'weight.quant_state.bitsandbytes__<nf4\|fp4>'"):
        qcore.from_pretrained(broken)


def test_missing_bitsandbytes_names_the_pip_command(checkpoints, bnb_dict, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(qcore.BackendUnavailable, match=re.escape(f"pip install '{REQUIREMENT}'")):
        qcore.from_pretrained(checkpoints["llama"], bnb_dict("nf4"))


def test_old_bitsandbytes_names_the_upgrade(checkpoints, bnb_dict, monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.43.3")
    with pytest.raises(qcore.BackendUnavailable, match=r"0\.43\.3 is too old .*" + re.escape(f"-U '{REQUIREMENT}'")):
        qcore.from_pretrained(checkpoints["llama"], bnb_dict("nf4"))


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"": "meta"}, "has no kernels for 'meta'"),
        pytest.param(
            {"": "cuda:0"}, "torch has no cuda device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)  # fmt: skip
def test_unusable_device_is_refused_before_any_weight_is_read(checkpoints, bnb_dict, monkeypatch, device_map, message):
    def no_reading(self):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(CheckpointReader, "stream", no_reading)
    with pytest.raises(qcore.BackendUnavailable, match=message):
        qcore.from_pretrained(checkpoints["llama"], bnb_dict("nf4"), device_map=device_map)


def test_offload_beside_an_accelerator_needs_the_fp32_offload_flag():
    import bitsandbytes

    device_map = {"model": 0, "lm_head": "cpu"}
    with pytest.raises(qcore.ConfigError, match=r"\['lm_head'\] are placed on the CPU or disk.*llm_int8_enable_fp32"):
        check_offload(BnbConfig(load_in_4bit=True), device_map)
    check_offload(BnbConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True), device_map)
    check_offload(BnbConfig(load_in_8bit=True), {"": "cpu"})
    check_devices(bitsandbytes, {"": "cpu", "lm_head": "disk"})
    with pytest.raises(qcore.ConfigError, match=r"\['lm_head'\] are mapped to 'disk', where quantized layers"):
        check_offload(
            BnbConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True), {"": "cpu", "lm_head": "disk"}
        )
