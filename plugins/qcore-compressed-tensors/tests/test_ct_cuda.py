"""On a CUDA GPU: the kernels qcore picks there (tinygemm int4, ``_scaled_mm`` for fp8 on sm89+), with the same
stored tensors and the same logits as on the CPU within the kernels' rounding. Skipped without CUDA."""

from __future__ import annotations

import pytest
import qcore
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

W4A16_G32 = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 32, "strategy": "group"}


def test_quantizing_on_the_gpu_stores_what_the_cpu_stores(llama, one_group):
    on_gpu = qcore.from_pretrained(llama, one_group(W4A16_G32), dtype=torch.bfloat16, device_map="cuda:0")
    on_cpu = qcore.from_pretrained(llama, one_group(W4A16_G32), dtype=torch.bfloat16)
    gpu, cpu = on_gpu.state_dict(), on_cpu.state_dict()
    assert gpu.keys() == cpu.keys()
    for key in cpu:
        assert torch.equal(gpu[key].cpu(), cpu[key]), key
    assert on_gpu.qcore_kernels == {"qcore-compressed-tensors": "torch.ops.aten._weight_int4pack_mm"}


def test_w4a16_reference_on_the_gpu(fixtures):
    name = "ct-w4a16-sym-pack-g128-768"
    expected = load_file(fixtures / name / "expected.safetensors")
    model = qcore.from_pretrained(fixtures / name, dtype=torch.bfloat16, device_map="cuda:0")
    with torch.no_grad():
        logits = model(expected["input_ids"].cuda()).logits.float().cpu()
    assert (logits - expected["logits"]).abs().max() <= 0.05  # bfloat16 through two layers, as on the CPU


def test_fp8_dynamic_reference_runs_scaled_mm_on_sm89(fixtures):
    name = "ct-fp8-dynamic-688"
    expected = load_file(fixtures / name / "expected.safetensors")
    model = qcore.from_pretrained(fixtures / name, dtype=torch.bfloat16, device_map="cuda:0")
    if torch.cuda.get_device_capability() >= (8, 9):
        assert model.qcore_kernels == {"qcore-compressed-tensors": "torch._scaled_mm"}
    with torch.no_grad():
        logits = model(expected["input_ids"].cuda()).logits.float().cpu()
    # fp8 activations per token in both, bfloat16 here against float32 there.
    assert (logits - expected["logits_decompressed"]).abs().max() <= 0.05
