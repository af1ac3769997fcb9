"""On a CUDA GPU: the configs torchao runs only there (Int4WeightOnlyConfig with torch's tinygemm packing, float8
dynamic activations on FP8 GPUs) quantize on the fly with transformers' logits. Skipped without CUDA."""

from __future__ import annotations

import pytest
import qcore
import torch
from qcore.testing import logits

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from torchao.core.config import config_to_dict  # noqa: E402
from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig, PerRow  # noqa: E402
from transformers import AutoModelForCausalLM, TorchAoConfig  # noqa: E402


def _both(llama, config):
    reference = AutoModelForCausalLM.from_pretrained(
        llama, quantization_config=TorchAoConfig(config), dtype=torch.bfloat16, device_map="cuda"
    )
    ours = qcore.from_pretrained(
        llama, {"quant_method": "torchao", "quant_type": {"default": config_to_dict(config)}}, dtype=torch.bfloat16,
        device_map="cuda",
    )  # fmt: skip
    return reference, ours


def test_int4_tinygemm_matches_transformers(llama):
    reference, ours = _both(llama, Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"))
    assert type(ours.model.layers[0].self_attn.q_proj.weight).__name__ == "Int4TilePackedTo4dTensor"
    assert torch.equal(logits(ours), logits(reference))


def test_float8_dynamic_matches_transformers_on_fp8_gpus(llama):
    if torch.cuda.get_device_capability() < (8, 9):
        config = {"quant_method": "torchao", "quant_type": "float8_dynamic_activation_float8_weight"}
        with pytest.raises(qcore.BackendUnavailable, match="compute capability 8.9"):
            qcore.from_pretrained(llama, config, device_map="cuda")
        return
    reference, ours = _both(llama, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    assert type(ours.model.layers[0].self_attn.q_proj.weight).__name__ == "Float8Tensor"
    assert torch.equal(logits(ours), logits(reference))
