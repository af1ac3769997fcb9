"""Whole models through qcore.from_pretrained on a CPU without the eetq package: quantize, run, save, reload, the
kernel report and validate's account, refused checkpoints, and the eetq package's paths with a stand-in for it."""

from __future__ import annotations

import json
import logging

import pytest
import qcore
import torch
from qcore_eetq.linear import EetqLinear
from qcore_eetq.quantize import EETQ_KERNEL, ROWS
from safetensors.torch import load_file, save_file

ARCHITECTURES = ("llama", "gpt2", "opt")
EETQ = {"quant_method": "eetq", "weights": "int8"}
#: The kernel qcore's kernel layer runs for a bfloat16 model on this CPU.
HALVES = "torch.ops.aten._weight_int4pack_mm_for_cpu on two 4-bit halves"


@pytest.fixture(scope="module")
def quantized(checkpoints):
    """Architecture -> the model quantized in bfloat16 on the CPU, without the eetq package."""
    import sys

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "EETQ", None)
        return {arch: qcore.from_pretrained(checkpoints[arch], EETQ, dtype=torch.bfloat16) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    """Architecture -> directory the quantized model was saved to."""
    root = tmp_path_factory.mktemp("eetq-saved")
    return {arch: qcore.save_pretrained(model, root / arch) for arch, model in quantized.items()}


def eetq_layers(model) -> dict[str, EetqLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, EetqLinear)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantizes_every_linear_but_lm_head_and_reports_the_kernel_layers_choice(quantized, arch):
    model = quantized[arch]
    layers = eetq_layers(model)
    assert layers and "lm_head" not in layers
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert model.qcore_kernels == {"qcore-eetq": f"{HALVES} (eetq package not installed)"}
    assert {layer.kernel for layer in layers.values()} == {"int4pack-cpu"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bfloat16_logits_are_within_rounding_of_the_dequantized_model(
    quantized, checkpoints, dequantized_reference, logits_of, arch
):
    model = quantized[arch]
    exact = logits_of(dequantized_reference(checkpoints[arch], model, torch.float64))
    kernel_error = (logits_of(model) - exact).abs().max()
    reference_error = (logits_of(dequantized_reference(checkpoints[arch], model, torch.bfloat16)) - exact).abs().max()
    # The kernel and the dequantized bfloat16 model both compute the same exact function up to bfloat16 roundings
    # of the same count and size (the kernel rounds each row's scale to bfloat16 where the reference rounds each
    # weight); twice the reference's own error bounds the kernel's. Measured ratios on these models: 0.9 to 1.2.
    assert kernel_error <= 2 * reference_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_and_float16_models_equal_the_dequantized_model(
    checkpoints, dequantized_reference, logits_of, dtype, no_eetq
):
    model = qcore.from_pretrained(checkpoints["llama"], EETQ, dtype=dtype)
    assert "dequantize + torch matmul" in model.qcore_kernels["qcore-eetq"]
    assert model.model.layers[0].mlp.down_proj.bias is None and model.dtype == dtype
    assert torch.equal(logits_of(model), logits_of(dequantized_reference(checkpoints["llama"], model, dtype)))


def test_layers_hold_one_byte_per_weight_plus_float16_row_scales(quantized, checkpoints):
    model = quantized["llama"]
    full = qcore.from_pretrained(checkpoints["llama"], dtype=torch.bfloat16)
    config = qcore.QuantConfig.from_dict(EETQ)
    for name, layer in eetq_layers(model).items():
        held = sum(t.numel() * t.element_size() for key, t in layer.state_dict().items() if key != "bias")
        out_features, in_features = full.get_submodule(name).weight.shape
        assert (
            held
            == out_features * in_features + 2 * out_features + 1
            == config.quantized_nbytes(out_features, in_features, 2)
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_writes_transformers_names_and_plain_rows_and_reloads_identically(quantized, saved, logits_of, arch):
    model, directory = quantized[arch], saved[arch]
    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": None}
    for name, layer in eetq_layers(model).items():
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert tuple(tensors[f"{name}.weight"].shape) == (layer.out_features, layer.in_features)
        assert tensors[f"{name}.weight_scales"].dtype == torch.float16
        assert tensors[f"{name}.weight_layout"].dtype == torch.uint8 and int(tensors[f"{name}.weight_layout"]) == ROWS
    reloaded = qcore.from_pretrained(directory)
    assert reloaded.dtype == torch.bfloat16 and reloaded.qcore_kernels == model.qcore_kernels
    assert torch.equal(logits_of(reloaded), logits_of(model))


def test_validate_explains_what_runs_here(checkpoints, caplog, no_eetq):
    with caplog.at_level(logging.INFO, logger="qcore.eetq"):
        qcore.from_pretrained(checkpoints["opt"], EETQ, dtype=torch.bfloat16)
    [message] = [r.getMessage() for r in caplog.records if r.name == "qcore.eetq"]
    assert "eetq package not installed" in message and "CUDA" in message
    assert "cpu: qcore.kernels int8 (eetq package not installed)" in message


def test_eetq_installed_without_cuda_runs_torchs_kernel_and_says_why(
    checkpoints, fake_eetq, caplog, logits_of, quantized
):
    with caplog.at_level(logging.INFO, logger="qcore.eetq"):
        model = qcore.from_pretrained(checkpoints["llama"], EETQ, dtype=torch.bfloat16)
    reason = "eetq package installed, but it runs on CUDA only"
    assert model.qcore_kernels == {"qcore-eetq": f"{HALVES} ({reason})"}
    assert any("eetq package installed" in r.getMessage() for r in caplog.records if r.name == "qcore.eetq")
    assert fake_eetq.calls == 0
    assert torch.equal(logits_of(model), logits_of(quantized["llama"]))


def test_eetq_kernel_layout_is_used_in_memory_and_saved_as_rows(
    checkpoints, fake_eetq, monkeypatch, logits_of, tmp_path
):
    """The eetq path as it runs on a GPU (simulated: the stand-in computes on the CPU)."""
    from qcore_eetq import environment

    monkeypatch.setattr(environment, "choose_kernel", lambda *args: environment.KernelChoice("eetq", "simulated"))
    model = qcore.from_pretrained(checkpoints["llama"], EETQ, dtype=torch.float16)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.kernel == "eetq" and int(layer.weight_layout) == EETQ_KERNEL
    assert tuple(layer.weight.shape) == (layer.in_features, layer.out_features)
    logits = logits_of(model)
    assert fake_eetq.calls > 0

    qcore.save_pretrained(model, tmp_path / "saved")
    monkeypatch.undo()  # reload without eetq: the plain-rows kernel must read the same weights
    reloaded = qcore.from_pretrained(tmp_path / "saved")
    assert int(reloaded.model.layers[0].mlp.down_proj.weight_layout) == ROWS
    plain = qcore.from_pretrained(checkpoints["llama"], EETQ, dtype=torch.float16)
    for name, rows in eetq_layers(plain).items():
        assert torch.equal(reloaded.get_submodule(name).weight, rows.weight), name
    # Only the summation differs between the stand-in's float32 GEMM and dequantize + float16 matmul.
    torch.testing.assert_close(logits_of(reloaded), logits, rtol=0, atol=2e-3)


def _rewrite(source, target, edit) -> None:
    import shutil

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def test_a_transformers_checkpoint_in_eetqs_interleaved_layout_is_refused(saved, tmp_path):
    def as_transformers_writes_it(tensors):
        for name in [n for n in tensors if n.endswith(".weight_layout")]:
            del tensors[name]
            weight = name.removesuffix("_layout")
            tensors[weight] = tensors[weight].t().contiguous()  # EetqLinear.weight is [in, out]

    _rewrite(saved["llama"], tmp_path / "transformers", as_transformers_writes_it)
    with pytest.raises(qcore.CheckpointError, match="interleaved layout.*not recorded.*quant_method': 'eetq'"):
        qcore.from_pretrained(tmp_path / "transformers")


@pytest.mark.parametrize("code", [EETQ_KERNEL, 7])
def test_a_layout_other_than_plain_rows_is_refused(saved, tmp_path, code):
    def relabel(tensors):
        tensors["model.layers.1.mlp.up_proj.weight_layout"] = torch.tensor(code, dtype=torch.uint8)

    _rewrite(saved["llama"], tmp_path / "relabelled", relabel)
    with pytest.raises(qcore.CheckpointError, match=rf"up_proj.weight_layout'.*layout {code} .*not plain rows"):
        qcore.from_pretrained(tmp_path / "relabelled")


def test_scales_of_the_wrong_dtype_are_refused(saved, tmp_path):
    def widen(tensors):
        tensors["model.layers.0.self_attn.o_proj.weight_scales"] = tensors[
            "model.layers.0.self_attn.o_proj.weight_scales"
        ].float()

    _rewrite(saved["llama"], tmp_path / "widened", widen)
    with pytest.raises(qcore.CheckpointError, match=r"o_proj.weight_scales'.*torch.float32.*expected torch.float16"):
        qcore.from_pretrained(tmp_path / "widened")


def test_a_full_precision_weight_where_the_config_says_quantized_is_refused(saved, checkpoints, tmp_path):
    def unquantize(tensors):
        name = "model.layers.0.mlp.gate_proj"
        for suffix in (".weight_scales", ".weight_layout"):
            del tensors[name + suffix]
        tensors[name + ".weight"] = load_file(checkpoints["llama"] / "model.safetensors")[name + ".weight"]

    _rewrite(saved["llama"], tmp_path / "mixed", unquantize)
    with pytest.raises(qcore.CheckpointError, match=r"gate_proj.weight'.*full precision.*modules_to_not_convert"):
        qcore.from_pretrained(tmp_path / "mixed")
