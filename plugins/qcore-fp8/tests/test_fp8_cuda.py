"""The CUDA paths: quantizing on the GPU writes the CPU's tensors, and per-tensor weights run torch._scaled_mm on
GPUs with FP8 tensor cores (sm89+). Skipped without CUDA."""

from __future__ import annotations

import pytest
import qcore
import torch
from qcore.testing.models import build, logits

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("fp8cuda") / "llama", hidden_size=128, intermediate_size=256)


def test_quantizing_on_the_gpu_writes_the_cpus_tensors(source, tmp_path):
    config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    on_gpu = qcore.from_pretrained(source, config, device_map="cuda:0")
    on_cpu = qcore.from_pretrained(source, config)
    gpu_layer, cpu_layer = on_gpu.model.layers[0].mlp.down_proj, on_cpu.model.layers[0].mlp.down_proj
    assert torch.equal(gpu_layer.weight.cpu().view(torch.uint8), cpu_layer.weight.view(torch.uint8))
    assert torch.equal(gpu_layer.weight_scale_inv.cpu(), cpu_layer.weight_scale_inv)


def test_per_tensor_weights_run_scaled_mm_on_fp8_gpus(source):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs sm89 or newer")
    model = qcore.from_pretrained(
        source, {"quant_method": "fp8", "weight_block_size": None}, device_map="cuda:0", dtype=torch.bfloat16
    )
    assert "_scaled_mm" in model.qcore_kernels["qcore-fp8"]
    reference = logits(qcore.from_pretrained(source, dtype=torch.bfloat16, device_map="cuda:0")).float()
    error = (logits(model).float() - reference).abs().max() / reference.abs().max()
    assert error < 0.1  # weights and activations both in e4m3
