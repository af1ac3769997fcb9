"""The reference every test compares with: transformers' own FP8 quantize op, run on the CPU."""

from __future__ import annotations

import pytest
import torch


def _transformers_quantize(weight: torch.Tensor, block, scale_fmt: str = "float"):
    """(codes, weight_scale_inv) from transformers' ``Fp8Quantize`` (what its FP8 quantizer writes on a GPU)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt)
    quantizer = type("Quantizer", (), {"quantization_config": config})()
    out = Fp8Quantize(quantizer).convert({"x.weight": weight})
    return out["x.weight"], out["x.weight_scale_inv"]


@pytest.fixture(scope="session")
def transformers_quantize():
    return _transformers_quantize
