"""FP8 checkpoints: transformers' format loads kept in FP8 (edge blocks too), saves the same format back, reloads
bit-identically, reads in transformers, converts into other methods, and damaged files are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore.testing.models import build, logits
from qcore_fp8.layers import FP8_DTYPE, Fp8Linear
from safetensors.torch import load_file, save_file

CONFIG = {"quant_method": "fp8", "weight_block_size": [32, 32], "activation_scheme": "dynamic"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A bf16 tiny Llama whose MLP is 96 wide: blocks of 64 leave edge blocks of 32 there."""
    return build("llama", tmp_path_factory.mktemp("fp8") / "llama", intermediate_size=96)


def written_by_transformers(source: Path, out: Path, block, transformers_quantize) -> Path:
    """The checkpoint transformers' FP8 quantizer writes: its own quantize op on every Linear but lm_head."""
    from transformers import FineGrainedFP8Config

    shutil.copytree(source, out)
    state = load_file(out / "model.safetensors")
    for name in [n for n in state if n.endswith("_proj.weight")]:
        codes, inverse = transformers_quantize(state[name], block)
        state[name], state[name.removesuffix("weight") + "weight_scale_inv"] = codes, inverse
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    quantization = FineGrainedFP8Config(weight_block_size=block).to_dict()
    quantization["quant_method"] = "fp8"
    config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def theirs(source, tmp_path_factory, transformers_quantize) -> Path:
    return written_by_transformers(source, tmp_path_factory.mktemp("theirs") / "llama", [32, 32], transformers_quantize)


def test_transformers_checkpoint_loads_kept_in_fp8_with_its_own_numbers(theirs):
    model = qcore.from_pretrained(theirs)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8_DTYPE
    stored = load_file(theirs / "model.safetensors")
    assert torch.equal(layer.weight.view(torch.uint8), stored["model.layers.0.mlp.down_proj.weight"].view(torch.uint8))
    # The same logits as transformers' own CPU load of the same file (it dequantizes every weight to bf16).
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(theirs)
    assert torch.equal(logits(model), logits(reference))


def test_on_the_fly_writes_what_transformers_writes(source, theirs, tmp_path):
    model = qcore.from_pretrained(source, CONFIG)
    qcore.save_pretrained(model, tmp_path / "ours")
    ours, expected = load_file(tmp_path / "ours" / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8))


EDGE_BLOCKS_REASON = (
    "transformers 5.24's CPU load (it dequantizes FP8 on a machine without FP8 matmul) takes the block size from "
    "the scale grid, rows // grid rows, so a 96-row weight with 64-row blocks (grid of 2) is read as blocks of 48"
)


@pytest.mark.parametrize(
    "block", [[32, 32], pytest.param([64, 64], marks=pytest.mark.xfail(strict=True, reason=EDGE_BLOCKS_REASON)), None]
)
def test_save_then_reload_is_bit_identical_and_transformers_reads_it(source, tmp_path, block):
    model = qcore.from_pretrained(source, {**CONFIG, "weight_block_size": block})
    expected = logits(model)
    qcore.save_pretrained(model, tmp_path / "saved")
    again = qcore.from_pretrained(tmp_path / "saved")
    assert torch.equal(logits(again), expected)
    assert (
        again.model.layers[0].mlp.down_proj.weight_scale_inv.shape
        == model.model.layers[0].mlp.down_proj.weight_scale_inv.shape
    )
    from transformers import AutoModelForCausalLM

    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), expected)


def test_each_weight_is_one_byte_plus_its_scales(source):
    model = qcore.from_pretrained(source, CONFIG)
    layer = model.model.layers[0].mlp.up_proj  # 96 x 64, blocks of 32
    assert layer.weight.element_size() == 1 and tuple(layer.weight_scale_inv.shape) == (3, 2)
    full = qcore.from_pretrained(source).get_memory_footprint()
    assert model.get_memory_footprint() < full


def test_dequantize_true_loads_full_precision_linears_with_the_same_numbers(theirs):
    fp8 = qcore.from_pretrained(theirs)
    plain = qcore.from_pretrained(theirs, {"quant_method": "fp8", "dequantize": True})
    assert type(plain.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(logits(plain), logits(fp8))


def test_dequantize_module_gives_the_weight_the_layer_computes_with(theirs):
    model = qcore.from_pretrained(theirs)
    qcore.dequantize(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(logits(model), logits(qcore.from_pretrained(theirs)))


def test_convert_an_fp8_checkpoint_into_another_installed_method(theirs, tmp_path):
    from qcore.cli import cli

    installed = {info.name for info in qcore.backends() if info.available}
    target = next(
        (p for b, p in (("hqq", "hqq-4bit"), ("bnb", "bnb-nf4"), ("eetq", "eetq-int8")) if b in installed), None
    )
    if target is None:
        pytest.skip("no other backend is installed")
    result = CliRunner().invoke(cli, ["convert", str(theirs), str(tmp_path / "out"), "--preset", target])
    assert result.exit_code == 0, result.output
    converted = qcore.from_pretrained(tmp_path / "out")
    reference = logits(qcore.from_pretrained(theirs)).float()
    error = (logits(converted).float() - reference).abs().max() / reference.abs().max()
    assert converted.quantization_method != "fp8" and error < 0.3


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda state, key: state.__setitem__(key + "_scale_inv", torch.ones(3, 3)),
            "does not match the weight's blocks",
        ),
        (lambda state, key: state.__setitem__(key, state[key].to(torch.float8_e5m2)), "F8_E5M2"),
        (lambda state, key: state.__setitem__(key + "_scale_inv", torch.zeros(2, 2)), "zero, negative or non-finite"),
        (lambda state, key: state.pop(key + "_scale_inv"), "no weight_scale_inv"),
    ],
)
def test_damaged_checkpoints_are_refused_naming_the_tensor(theirs, tmp_path, change, words):
    damaged = tmp_path / "damaged"
    shutil.copytree(theirs, damaged)
    state = load_file(damaged / "model.safetensors")
    change(state, "model.layers.1.self_attn.q_proj.weight")
    save_file(state, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qcore.CheckpointError, match=words) as error:
        qcore.from_pretrained(damaged)
    assert "model.layers.1.self_attn.q_proj" in str(error.value)
