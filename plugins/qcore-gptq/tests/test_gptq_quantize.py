"""Quantizing with GPTQ through the core's calibration (one decoder block at a time), the checkpoint it writes, and
every refusal: each before any weight is read where the header or the config already tells."""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from qcore.testing import logits
from qcore_gptq.gptq import quantize_layer
from qcore_gptq.layers import GptqLinear
from safetensors.torch import load_file, save_file


def _quantize(path, calibration, **settings):
    return qcore.from_pretrained(path, {"quant_method": "gptq", "group_size": 32, **settings}, calibration=calibration)


def test_writes_a_standard_gptq_checkpoint(gptq_llama):
    model, saved = gptq_llama
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    expected = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}
    assert {key: config[key] for key in expected} == expected and config["checkpoint_format"] == "gptq"
    assert config["format"] == "gptq" and config["pack_dtype"] == "int32"
    tensors = load_file(saved / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj."  # Linear(128, 64)
    assert tensors[prefix + "qweight"].shape == (16, 64) and tensors[prefix + "qweight"].dtype == torch.int32
    assert tensors[prefix + "qzeros"].shape == (4, 8) and tensors[prefix + "scales"].dtype == torch.float16
    assert torch.equal(tensors[prefix + "g_idx"], (torch.arange(128) // 32).to(torch.int32))
    assert (tensors[prefix + "qzeros"] == 0x77777777).all()  # symmetric: zero 8, stored v1 as 7
    assert prefix + "weight" not in tensors and "lm_head.weight" in tensors


def test_reload_is_bit_identical_and_not_requantized(gptq_llama):
    model, saved = gptq_llama
    reloaded = qcore.from_pretrained(saved, calibration=torch.zeros(1, 1, dtype=torch.long))  # unused: pre-quantized
    assert isinstance(reloaded.model.layers[1].self_attn.o_proj, GptqLinear)
    assert torch.equal(logits(reloaded), logits(model))
    resaved = qcore.save_pretrained(reloaded, saved.parent / "again")
    first, second = load_file(saved / "model.safetensors"), load_file(resaved / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_gptq_beats_round_to_nearest_on_the_calibration_data(gptq_llama, checkpoints, calibration_ids):
    """The whole model: logits of GPTQ are closer to full precision than those of RTN on the same grids."""
    model, _ = gptq_llama
    reference = qcore.from_pretrained(checkpoints["llama"])
    rtn = qcore.from_pretrained(checkpoints["llama"])
    for name, module in rtn.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            decoded = quantize_layer(
                module.weight, torch.eye(module.in_features), bits=4, group_size=32, sym=True, desc_act=False,
                damp_percent=0.1,
            )  # fmt: skip
            groups = decoded.g_idx.long()
            module.weight.data = (decoded.codes.float() - decoded.zero.float()[:, groups]) * decoded.scale.float()[
                :, groups
            ]
    expected = logits(reference, calibration_ids)
    gptq_error = (logits(model, calibration_ids) - expected).pow(2).mean()
    rtn_error = (logits(rtn, calibration_ids) - expected).pow(2).mean()
    assert gptq_error < rtn_error


@pytest.mark.parametrize(
    "arch, settings",
    [
        ("llama", dict(bits=4, desc_act=True, sym=False, checkpoint_format="gptq_v2")),
        ("llama", dict(bits=3, sym=False)),
        ("llama", dict(bits=8, true_sequential=False)),
        ("gpt2", dict(bits=4, desc_act=True)),
        ("opt", dict(bits=2, group_size=-1)),
    ],
)
def test_every_setting_saves_and_reloads_bit_identically(checkpoints, calibration_ids, tmp_path, arch, settings):
    model = _quantize(checkpoints[arch], calibration_ids[:4], **settings)
    saved = qcore.save_pretrained(model, tmp_path / "out")
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert all(config[key] == value for key, value in settings.items())
    reloaded = qcore.from_pretrained(saved)
    assert torch.equal(logits(reloaded), logits(model))
    if settings.get("desc_act"):
        g_idx = next(t for k, t in load_file(saved / "model.safetensors").items() if k.endswith("g_idx"))
        assert not torch.equal(g_idx, torch.sort(g_idx).values)  # act-order: groups interleave


def test_dequantize_gives_the_weights_the_model_computes_with(gptq_llama):
    _, saved = gptq_llama
    model = qcore.from_pretrained(saved)
    expected = {name: m.dequantized(torch.float32) for name, m in model.named_modules() if isinstance(m, GptqLinear)}
    quantized = logits(model)
    qcore.dequantize(model)
    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert type(module) is torch.nn.Linear and torch.equal(module.weight, weight), name
    torch.testing.assert_close(logits(model), quantized, atol=1e-4, rtol=1e-4)


# -- refusals ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Make any read of tensor data fail, to show a refusal comes before the first one."""
    from qcore import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read before the refusal")

    for provider in (checkpoint.CheckpointReader,):
        monkeypatch.setattr(provider, "read", refuse)
        monkeypatch.setattr(provider, "stream", refuse)


def test_strict_group_size_refuses_a_width_the_group_size_does_not_divide_before_reading(
    checkpoints, calibration_ids, no_weight_reads
):
    with pytest.raises(
        qcore.ConfigError,
        match=r"'group_size'=48 does not divide in_features=64 of module 'model\.layers\.0\.self_attn\.q_proj'",
    ):
        _quantize(checkpoints["llama"], calibration_ids, group_size=48, strict_group_size=True)
    with pytest.raises(qcore.ConfigError, match="strict_group_size is set"):
        qcore.from_pretrained(
            checkpoints["llama"], {"quant_method": "gptq", "strict_group_size": True}, calibration=calibration_ids
        )


@pytest.mark.parametrize("calibration", [[], [[5]]], ids=["empty", "one-token"])
def test_calibration_that_is_empty_or_too_short_is_refused(checkpoints, calibration, no_weight_reads):
    with pytest.raises(qcore.ConfigError, match="calibration"):
        _quantize(checkpoints["llama"], calibration)


def test_awq_quantization_is_refused_with_the_alternative(checkpoints):
    with pytest.raises(qcore.ConfigError, match="AutoAWQ"):
        qcore.from_pretrained(checkpoints["llama"], {"quant_method": "awq"})


def _edit(saved, tmp_path, *, config=None, tensors=None):
    """A copy of a saved GPTQ checkpoint with quantization_config fields or tensors replaced."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(saved, out)
    if config:
        data = json.loads((out / "config.json").read_text())
        data["quantization_config"].update(config)
        (out / "config.json").write_text(json.dumps(data))
    if tensors:
        state = load_file(out / "model.safetensors")
        for key, value in tensors.items():
            if value is None:
                del state[key]
            else:
                state[key] = value
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_qweight_disagreeing_with_bits_is_refused_from_the_header(gptq_llama, tmp_path, no_weight_reads):
    _, saved = gptq_llama
    edited = _edit(saved, tmp_path, config={"bits": 8})
    with pytest.raises(qcore.CheckpointError, match=r"q_proj.*bits=8.*qweight as \[16, 64\].*found \[8, 64\]"):
        qcore.from_pretrained(edited)


def test_qzeros_disagreeing_with_group_size_is_refused(gptq_llama, tmp_path, no_weight_reads):
    _, saved = gptq_llama
    edited = _edit(saved, tmp_path, config={"group_size": 64})
    with pytest.raises(qcore.CheckpointError, match=r"group_size=64.*qzeros.*Fix bits/group_size/format"):
        qcore.from_pretrained(edited)


def test_a_missing_tensor_is_refused(gptq_llama, tmp_path):
    _, saved = gptq_llama
    edited = _edit(saved, tmp_path, tensors={"model.layers.0.mlp.up_proj.qzeros": None})
    with pytest.raises(qcore.CheckpointError, match=r"up_proj.*lacks \['qzeros'\]"):
        qcore.from_pretrained(edited)


def test_a_corrupt_g_idx_is_refused(gptq_llama, tmp_path):
    _, saved = gptq_llama
    bad = torch.full((64,), 7, dtype=torch.int32)
    edited = _edit(saved, tmp_path, tensors={"model.layers.0.self_attn.k_proj.g_idx": bad})
    with pytest.raises(qcore.CheckpointError, match=r"k_proj.*g_idx must assign each of the 2 groups 32"):
        qcore.from_pretrained(edited)


def test_load_state_dict_rebuilds_the_modules_and_checks_them(gptq_llama, checkpoints, calibration_ids):
    """``state_dict``/``load_state_dict`` are inverses in the GPTQ format, and a wrong shape is refused by name."""
    model, _ = gptq_llama
    other = _quantize(checkpoints["llama"], calibration_ids[4:], bits=4)
    assert not torch.equal(logits(other), logits(model))
    other.load_state_dict(model.state_dict())
    assert torch.equal(logits(other), logits(model))
    state = model.state_dict()
    state["model.layers.0.mlp.up_proj.qweight"] = state["model.layers.0.mlp.up_proj.qweight"][:3]
    with pytest.raises(RuntimeError, match=r"up_proj.*qweight as \[8, 128\] I32, found \[3, 128\]"):
        other.load_state_dict(state)
