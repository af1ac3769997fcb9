"""HQQ layers on qcore's kernel layer (CPU, bfloat16): within a stated bound of hqq's own dequantized matmul, the
stored form unchanged bit for bit, hqq's path kept wherever the kernel layer has no kernel, LoRA-style gradients; and
quantizing hands hqq's float32 temporaries back to the system."""

from __future__ import annotations

import subprocess
import sys

import pytest
import qcore
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from qcore.testing import build
from qcore_hqq.kernels import hqq_codes, kernel_weight, pin_backends, use_kernel_weight
from safetensors.torch import load_file
from torch import nn

BF16_UNIT_ROUNDOFF = 2.0**-8


def hqq_layer(nbits, group_size, out_features=128, in_features=512, axis=1, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=True).to(dtype)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis)
    return HQQLinear(linear, config, compute_dtype=dtype, device="cpu")


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("nbits", [4, 8])
def test_kernel_is_within_its_bound_of_hqqs_dequantized_matmul(nbits, group_size):
    """The bound: the kernel layer's own (vs the exact weight rounded once to bfloat16) plus hqq's roundings,
    ``(q - z)`` and ``* s`` each rounded to bfloat16 and its output once: 3u |x| @ |W|.T."""
    layer = hqq_layer(nbits, group_size)
    x = torch.randn(4, 3, 512, dtype=torch.bfloat16)
    expected = layer.forward_pytorch(x)
    weight = kernel_weight(layer)
    assert weight.select("cpu", torch.bfloat16) == "int4pack-cpu"
    use_kernel_weight(layer, weight)
    error = (layer(x).double() - expected.double()).abs()
    exact = weight.dequantize(torch.float64).abs()
    bound = weight.error_bound(x) + 3 * BF16_UNIT_ROUNDOFF * (x.abs().double() @ exact.T)
    assert (error <= bound).all()
    assert error.max() > 0, "a different kernel ran, so results differ in the last bits"


@pytest.mark.parametrize("nbits", [4, 8])
def test_stored_form_is_unchanged_and_w_q_is_held_once(nbits):
    layer = hqq_layer(nbits, 64)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}
    dequantized = layer.dequantize().clone()
    weight = kernel_weight(layer)
    weight.select("cpu", torch.bfloat16)
    assert torch.equal(hqq_codes(weight, layer.meta), before["W_q"])
    use_kernel_weight(layer, weight)
    assert layer.W_q.shape == before["W_q"].shape and layer.W_q.untyped_storage().nbytes() == 1
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value, key
    assert torch.equal(layer.dequantize(), dequantized)
    assert layer.W_q.untyped_storage().nbytes() == 1, "W_q goes back to the placeholder after each call"


@pytest.mark.parametrize(
    ("nbits", "group_size", "out_features", "axis", "dtype"),
    [
        (2, 64, 128, 1, torch.bfloat16),  # no 2-bit kernel
        (4, 64, 128, 0, torch.bfloat16),  # groups along the output axis
        (4, 64, 120, 1, torch.bfloat16),  # out_features not a multiple of 16
        (4, 64, 128, 1, torch.float32),  # the CPU int4 kernel is fast in bfloat16 only
    ],
)
def test_layers_outside_the_kernels_keep_hqqs_path(nbits, group_size, out_features, axis, dtype):
    layer = hqq_layer(nbits, group_size, out_features=out_features, axis=axis, dtype=dtype)
    x = torch.randn(2, 512, dtype=dtype)
    expected = layer.forward_pytorch(x)
    assert pin_backends([layer]) == "hqq PYTORCH"
    assert not hasattr(layer, "qcore_weight")
    assert torch.equal(layer(x), expected)


def test_gradients_reach_the_activations():
    layer = hqq_layer(4, 64)
    weight = kernel_weight(layer)
    weight.select("cpu", torch.bfloat16)
    use_kernel_weight(layer, weight)
    x = torch.randn(3, 512, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 128, dtype=torch.bfloat16) @ weight.dequantize(torch.bfloat16))


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("tiny-llama-bf16"), dtype=torch.bfloat16)


@pytest.mark.parametrize("preset", ["hqq-4bit", "hqq-8bit"])
def test_bfloat16_model_runs_the_kernel_and_saves_what_hqq_saves(llama_bf16, preset, tmp_path):
    from qcore.plugins import preset_config

    model = qcore.from_pretrained(llama_bf16, preset_config(preset), dtype=torch.bfloat16)
    assert model.qcore_kernels == {"qcore-hqq": "qcore.kernels torch.ops.aten._weight_int4pack_mm_for_cpu"}
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids).logits
    qcore.save_pretrained(model, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    for name, layer in model.named_modules():
        if isinstance(layer, HQQLinear):
            assert torch.equal(saved[f"{name}.W_q"], hqq_codes(layer.qcore_weight, layer.meta)), name
    reloaded = qcore.from_pretrained(tmp_path / "saved")
    assert reloaded.qcore_kernels == model.qcore_kernels
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)


# -- memory while quantizing ---------------------------------------------------------------------------------------

_RETENTION_PROBE = """
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from qcore_hqq.layers import _map_large_allocations

def anonymous():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon"))

_map_large_allocations()
generator = torch.Generator().manual_seed(0)
start, layers = anonymous(), []
for _ in range(6):
    weight = (torch.randn(1536, 1024, generator=generator) * 0.02).to(torch.bfloat16)
    layer = HQQLinear(None, BaseQuantizeConfig(nbits=4, group_size=64, axis=1), compute_dtype=torch.bfloat16,
                      device="cpu", initialize=False)
    layer.quantize(weight, **layer.quant_config)
    layers.append(layer)
    del weight
held = sum(l.W_q.nbytes + l.meta["scale"].nbytes + l.meta["zero"].nbytes for l in layers)
print(anonymous() - start - held)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_quantizing_gives_hqqs_float32_temporaries_back():
    """Without the fixed mmap threshold glibc kept about a float32 copy (6 MiB here) per quantized layer."""
    result = subprocess.run([sys.executable, "-c", _RETENTION_PROBE], capture_output=True, text=True, check=True)
    kept = int(result.stdout.split()[-1])
    assert kept < 2 * 1536 * 1024 * 4, f"{kept / 2**20:.0f} MiB kept beyond the quantized layers"
