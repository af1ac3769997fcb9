"""The CUDA paths: torch's int8 kernel on the GPU, and the eetq package's GEMM when it is installed. Skipped
without a GPU (and the second without eetq)."""

from __future__ import annotations

import pytest
import qcore
import torch
from qcore_eetq.environment import eetq_kernels
from qcore_eetq.linear import EetqLinear

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

EETQ = {"quant_method": "eetq", "weights": "int8"}


def _within_rounding(model, path, dtype, dequantized_reference, logits_of) -> None:
    # As on the CPU: the kernel and the dequantized model in the same dtype differ from the exact (float64) function
    # only by roundings of the same count and size, so the kernel's error is at most twice the reference's.
    exact = logits_of(dequantized_reference(path, model, torch.float64))
    reference = logits_of(dequantized_reference(path, model, dtype, device_map="cuda:0"))
    assert (logits_of(model) - exact).abs().max() <= 2 * (reference - exact).abs().max()


def _same_rows_as_on_the_cpu(model, path, dtype) -> None:
    on_cpu = qcore.from_pretrained(path, EETQ, dtype=dtype)
    for name, layer in model.named_modules():
        if isinstance(layer, EetqLinear):
            state = layer.state_dict()
            assert torch.equal(state["weight"].cpu(), on_cpu.get_submodule(name).state_dict()["weight"]), name
            assert torch.equal(state["weight_scales"].cpu(), on_cpu.get_submodule(name).weight_scales), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_int8_kernel_on_cuda(checkpoints, no_eetq, dequantized_reference, logits_of, tmp_path, dtype):
    model = qcore.from_pretrained(checkpoints["llama"], EETQ, dtype=dtype, device_map="cuda:0")
    assert model.qcore_kernels == {"qcore-eetq": "torch._weight_int8pack_mm (eetq package not installed)"}
    _within_rounding(model, checkpoints["llama"], dtype, dequantized_reference, logits_of)
    _same_rows_as_on_the_cpu(model, checkpoints["llama"], dtype)
    qcore.save_pretrained(model, tmp_path / "saved")
    reloaded = qcore.from_pretrained(tmp_path / "saved", device_map="cuda:0")
    assert torch.equal(logits_of(reloaded), logits_of(model))


@pytest.mark.skipif(eetq_kernels() is None, reason="needs the eetq package (pip install from its source)")
def test_eetq_package_kernel(checkpoints, dequantized_reference, logits_of, tmp_path):
    if not (7, 0) <= torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("eetq's weight layout supports sm70 to sm89")
    # A model whose in/out features are multiples of eetq's 64-wide tiles.
    from qcore.testing import build

    path = build("llama", tmp_path / "llama", dtype=torch.float16, hidden_size=128, intermediate_size=256)
    model = qcore.from_pretrained(path, EETQ, dtype=torch.float16, device_map="cuda:0")
    assert model.qcore_kernels["qcore-eetq"].startswith("eetq w8_a16_gemm")
    _within_rounding(model, path, torch.float16, dequantized_reference, logits_of)
    # Saving inverts eetq's layout exactly: the rows are those quantizing on the CPU gives.
    _same_rows_as_on_the_cpu(model, path, torch.float16)
    qcore.save_pretrained(model, tmp_path / "saved")
    reloaded = qcore.from_pretrained(tmp_path / "saved", device_map="cuda:0")
    assert reloaded.qcore_kernels == model.qcore_kernels
    assert torch.equal(logits_of(reloaded), logits_of(model))
