"""``dequantize_module`` of the in-repo backends (bnb, hqq, eetq), and ``qcore convert`` between real methods.

Each backend's hook must give the weight its layer computes with, leave the layer as it was and share no memory with
it; the conversions are the ones the convert command exists for: a bnb nf4 checkpoint into compressed-tensors (read
back by compressed-tensors' own ``ModelCompressor`` and by transformers) and an HQQ checkpoint into full precision
(the logits of ``qcore.dequantize`` of the HQQ model). A backend that is not installed skips its tests.
"""

from __future__ import annotations

import json
import math

import pytest
import qcore
import tiny_models
import torch
from click.testing import CliRunner
from qcore.cli import cli
from qcore.convert import dequantize_module
from torch.nn import functional as F

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_compute_dtype": "bfloat16"}  # fmt: skip
#: name -> (plugin, config); the hqq and eetq configs run qcore.kernels' CPU kernels in bfloat16, dequantize +
#: matmul (their own or hqq's) in float32.
CONFIGS = {
    "bnb-nf4": ("qcore_bnb", NF4),
    "bnb-fp4-dq": ("qcore_bnb", {**NF4, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}),
    "bnb-int8": ("qcore_bnb", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
    "hqq-4bit": ("qcore_hqq", {"quant_method": "hqq", "nbits": 4, "group_size": 64, "axis": 1}),
    "hqq-8bit": ("qcore_hqq", {"quant_method": "hqq", "nbits": 8, "group_size": 64, "axis": 1}),
    "eetq": ("qcore_eetq", {"quant_method": "eetq", "weights": "int8"}),
}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}


def _matmul_bound(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far two matmuls of the same ``dtype`` operands may differ per element: each rounds its result to
    ``dtype`` and accumulates ``K`` products in float32, in any order (the kernel layer's bound for dequantize)."""
    u, eps32 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    k = weight.shape[1]
    return (3 * u + 2 * k * eps32) * (x.abs().double() @ weight.abs().double().T)


def _bound(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The documented bound on ``|module(x) - x @ weight.T - bias|``, for the kernel the module runs."""
    kernel_weight = getattr(module, "qcore_weight", getattr(module, "packed", None))
    if kernel_weight is not None:  # hqq or eetq on a qcore.kernels kernel: the kernel layer's own bound
        return kernel_weight.error_bound(x) + _matmul_bound(x, weight, x.dtype)
    if type(module).__name__ == "Linear8bitLt":
        # LLM.int8() rounds each activation row to int8 steps of max|row| / 127 (half a step at most) and computes
        # in float16 (the columns above its threshold included), the result rounded to float16 and to x's dtype.
        steps = x.abs().amax(dim=-1, keepdim=True).double() / 254
        coarser = max(torch.float16, x.dtype, key=lambda dtype: torch.finfo(dtype).eps)
        return steps * weight.abs().double().sum(dim=1) + _matmul_bound(x, weight, coarser)
    compute = getattr(module, "compute_dtype", x.dtype)  # bnb 4-bit casts to its compute dtype
    return _matmul_bound(x, weight, compute if isinstance(compute, torch.dtype) else x.dtype)


@pytest.fixture(scope="module")
def loaded(llama):
    """(config name, dtype, device) -> the tiny Llama quantized with it, built once."""
    models = {}

    def loaded(name: str, dtype: torch.dtype, device: str = "cpu"):
        plugin, config = CONFIGS[name]
        pytest.importorskip(plugin)
        if (name, dtype, device) not in models:
            models[name, dtype, device] = qcore.from_pretrained(llama, config, dtype=dtype, device_map={"": device})
        return models[name, dtype, device]

    return loaded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dequantize_module_gives_the_weight_the_layer_computes_with_and_leaves_it_unchanged(loaded, name, dtype):
    _check_dequantize_module(loaded(name, dtype), name, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dequantize_module_on_cuda_gives_the_weight_the_layer_computes_with(loaded, name, dtype):
    _check_dequantize_module(loaded(name, dtype, "cuda:0"), name, dtype)


def _check_dequantize_module(model, name: str, dtype: torch.dtype) -> None:
    """For every quantized module: new tensors of the plain shape, dtype and device, the module's output and saved
    tensors unchanged by the call, and its output within the documented bound of ``x @ weight.T + bias``."""
    assert model.qcore_applied
    generator = torch.Generator().manual_seed(0)
    for module_name in model.qcore_applied:
        module = model.get_submodule(module_name)
        in_features = module.in_features
        device = next(t.device for t in module.parameters() if t.device.type != "meta")
        x = torch.randn(3, in_features, generator=generator).to(device=device, dtype=dtype)
        with torch.no_grad():
            before, saved = module(x), {k: v.clone() for k, v in module.state_dict().items()}
        tensors = dequantize_module(model, module_name, dtype)
        weight, bias = tensors["weight"], tensors.get("bias")
        assert weight.dtype == dtype and weight.shape == (module.out_features, in_features)
        assert weight.device == x.device and not _storages(module) & {t.untyped_storage().data_ptr()
                                                                       for t in tensors.values()}  # fmt: skip
        with torch.no_grad():
            after = module(x)
            error = (after.double() - F.linear(x, weight, bias).double()).abs()
        assert torch.equal(after, before), f"{name} {module_name}: dequantize_module changed what the layer computes"
        state = module.state_dict()
        assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved), module_name
        assert bool((error <= _bound(module, x, weight) + 1e-30).all()), (
            f"{name} {module_name}: the layer computes {float(error.max()):.3g} away from its dequantized weight"
        )


def test_bnb_dequantizes_a_layer_repacked_for_the_cpu_kernel_with_the_block_scales_it_uses(llama):
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first inference forward (where the
    CPU has one), with bfloat16 block scales: the dequantized weight then comes from those, so it moves by at most
    their bfloat16 rounding (none for plain nf4 of a bfloat16 model, whose block maxima are bfloat16 values), and the
    layer stays repacked. Repacked here by hand, so that CPUs without the kernel check it too."""
    pytest.importorskip("qcore_bnb")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for config, exact in ((NF4, True), (CONFIGS["bnb-fp4-dq"][1], False)):
        model = qcore.from_pretrained(llama, config)
        module_name = "model.layers.1.mlp.down_proj"
        layer = model.get_submodule(module_name)
        plain = dequantize_module(model, module_name, torch.float32)["weight"]
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )
        layer.quant_state = layer.weight.quant_state
        packed = layer.weight.data.clone()
        repacked = dequantize_module(model, module_name, torch.float32)["weight"]
        assert layer.weight.quant_state.packing_format_for_cpu and torch.equal(layer.weight.data, packed)
        error = float((repacked - plain).abs().max() / plain.abs().max())
        assert error == 0 if exact else 0 < error <= 2**-8, error


# -- conversions ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama128(tmp_path_factory):
    """A bfloat16 tiny Llama whose Linears have 128 or 256 input features: whole groups of 128 for ct-w4a16."""
    return tiny_models.build("llama", tmp_path_factory.mktemp("llama128"), hidden_size=128, intermediate_size=256)


def _quantized_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__ == "CompressedLinear"]


def test_bnb_nf4_checkpoint_converts_into_compressed_tensors_that_compressed_tensors_and_transformers_read(
    llama128, tmp_path
):
    pytest.importorskip("qcore_bnb")
    pytest.importorskip("qcore_compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from qcore_compressed_tensors.layers import compress
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    bnb_dir, out = tmp_path / "bnb", tmp_path / "ct"
    qcore.save_pretrained(qcore.from_pretrained(llama128, NF4), bnb_dir)
    result = CliRunner().invoke(cli, ["convert", str(bnb_dir), str(out), "--preset", "ct-w4a16"])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "compressed-tensors" and stored["format"] == "pack-quantized"

    # Each module is compressed-tensors' quantization of the bnb module's dequantized weight, nothing else.
    source, converted = qcore.from_pretrained(bnb_dir), qcore.from_pretrained(out)
    names = _quantized_names(converted)
    assert len(names) == 14
    for name in names:
        expected = compress(
            dequantize_module(source, name, torch.bfloat16)["weight"], converted.get_submodule(name).scheme
        )
        saved = converted.get_submodule(name).state_dict()
        assert all(torch.equal(saved[key], expected[key]) for key in expected), name

    # compressed-tensors' own lifecycle on the files: compress the base model's layout, load, decompress.
    config = QuantizationConfig.model_validate(stored)
    base = AutoModelForCausalLM.from_pretrained(llama128, dtype=torch.bfloat16)
    apply_quantization_config(base, config, show_progress=False)
    for module in base.modules():
        if hasattr(module, "weight_scale"):
            module.weight_scale.data.fill_(1)  # any finite scale: the saved tensors replace what compress makes
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(base)
    base.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    compressor.decompress_model(base)
    dense = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name in names:
        ours = dequantize_module(converted, name, torch.bfloat16)["weight"]
        assert torch.equal(ours, base.get_submodule(name).weight.detach()), name
        assert torch.equal(ours, dense.get_submodule(name).weight.detach()), name

    # transformers' default route runs it, with the converted model's logits (int4 kernel rounding apart).
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs, ours = reference(IDS).logits.float(), converted(IDS).logits.float()
    assert float((ours - theirs).abs().max()) <= 0.02


def test_hqq_checkpoint_converts_into_full_precision_with_the_logits_of_the_dequantized_model(llama, tmp_path):
    pytest.importorskip("qcore_hqq")
    from transformers import AutoModelForCausalLM

    hqq_dir, out = tmp_path / "hqq", tmp_path / "full"
    qcore.save_pretrained(qcore.from_pretrained(llama, CONFIGS["hqq-4bit"][1]), hqq_dir)
    result = CliRunner().invoke(cli, ["convert", str(hqq_dir), str(out), "--full-precision"])
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    expected = tiny_models.logits(qcore.dequantize(qcore.from_pretrained(hqq_dir)))
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.dtype == torch.bfloat16 and not getattr(plain, "is_quantized", False)
    assert torch.equal(tiny_models.logits(plain), expected)
    quantized = tiny_models.logits(qcore.from_pretrained(hqq_dir)).float()
    error = (expected.float() - quantized).abs().max() / quantized.abs().max()
    assert math.isfinite(error) and error <= 0.05  # the conformance suite's dequantize_tolerance
