"""On CUDA: qcore-bnb loads 4-bit and 8-bit models onto the GPU with the logits transformers' own path gives there,
and reports the CUDA kernel path."""

from __future__ import annotations

import pytest
import qcore
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["nf4", "nf4-dq", "int8"])
def test_cuda_load_matches_transformers(checkpoints, method, dtype, bnb_dict, reference_model, logits_of):
    reference = reference_model(checkpoints["llama"], method, dtype, device_map={"": 0})
    model = qcore.from_pretrained(checkpoints["llama"], bnb_dict(method), dtype=dtype, device_map={"": "cuda:0"})

    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert torch.equal(logits_of(model), logits_of(reference))
    assert "cuda:" in model.qcore_kernels["qcore-bnb"]


def test_cuda_prequantized_round_trip(checkpoints, bnb_dict, logits_of, tmp_path):
    model = qcore.from_pretrained(checkpoints["gpt2"], bnb_dict("nf4"), dtype=torch.float16, device_map={"": "cuda:0"})
    saved = qcore.save_pretrained(model, tmp_path / "saved")
    reloaded = qcore.from_pretrained(saved, dtype=torch.float16, device_map={"": "cuda:0"})
    assert torch.equal(logits_of(reloaded), logits_of(model))
