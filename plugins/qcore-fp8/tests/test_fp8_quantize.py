"""On-the-fly quantization is bit for bit transformers' FP8 quantizer, and the config dict is transformers' own."""

from __future__ import annotations

import math

import pytest
import torch
from qcore import ConfigError, QuantConfig
from qcore_fp8.config import Fp8Config
from qcore_fp8.layers import FP8_DTYPE, quantize


def weights(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * torch.logspace(-3, 1, columns)  # wide range of sizes
    weight[:, :7] = 0  # an all-zero block edge
    return weight.to(torch.bfloat16)


@pytest.mark.parametrize("block", [[128, 128], [32, 64], [64, 32], None])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_is_bit_for_bit_transformers(block, scale_fmt, transformers_quantize):
    weight = weights(256, 256)
    if block is None:
        weight[:] = 0
        weight[3, 5] = 2.5  # one scale for the whole tensor
    codes, inverse = quantize(weight, tuple(block) if block else None, scale_fmt)
    expected_codes, expected_inverse = transformers_quantize(weight, block, scale_fmt)
    assert codes.dtype == FP8_DTYPE and torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    assert inverse.dtype == expected_inverse.dtype
    assert torch.equal(inverse.float().flatten(), expected_inverse.float().flatten())


def test_an_all_zero_block_keeps_scale_one_and_zero_codes():
    weight = torch.zeros(64, 64)
    codes, inverse = quantize(weight, (32, 32))
    assert torch.equal(inverse, torch.ones(2, 2)) and not codes.float().any()


def test_sizes_the_block_does_not_divide_get_smaller_edge_blocks(transformers_quantize):
    weight = weights(100, 72)
    codes, inverse = quantize(weight, (32, 32))
    assert inverse.shape == (math.ceil(100 / 32), math.ceil(72 / 32))
    # Each block, edge ones included, is what transformers computes for that block on its own.
    for r in range(inverse.shape[0]):
        for c in range(inverse.shape[1]):
            piece = weight[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
            expected_codes, expected_inverse = transformers_quantize(piece, list(piece.shape))
            assert torch.equal(inverse[r, c].reshape(1), expected_inverse.reshape(1))
            got = codes[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
            assert torch.equal(got.view(torch.uint8), expected_codes.view(torch.uint8))


def test_config_dict_is_transformers_own():
    from transformers import FineGrainedFP8Config

    for kwargs in ({}, {"weight_block_size": None}, {"activation_scheme": "static", "weight_block_size": (64, 64)}):
        theirs = FineGrainedFP8Config(**kwargs).to_dict()
        theirs["quant_method"] = str(theirs["quant_method"].value)
        theirs["weight_block_size"] = list(theirs["weight_block_size"]) if theirs["weight_block_size"] else None
        ours = QuantConfig.from_dict(theirs)
        assert isinstance(ours, Fp8Config) and ours.to_dict() == theirs


def test_deepseeks_skip_list_spelling_is_accepted():
    config = QuantConfig.from_dict({"quant_method": "fp8", "ignored_layers": ["lm_head"]})
    assert config.modules_to_not_convert == ["lm_head"]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("weight_block_size", [128], "two positive integers"),
        ("weight_block_size", [0, 128], "two positive integers"),
        ("activation_scheme", "lazy", "activation_scheme"),
        ("scale_fmt", "e5m2", "scale_fmt"),
        ("expert_dtype", "fp4", "expert_dtype"),
    ],
)
def test_bad_fields_name_themselves(field, value, words):
    with pytest.raises(ConfigError, match=words):
        QuantConfig.from_dict({"quant_method": "fp8", field: value})


def test_quantized_size_counts_a_byte_a_weight_and_the_edge_blocks():
    config = Fp8Config(weight_block_size=[128, 128])
    assert config.quantized_nbytes(300, 256, 2) == 300 * 256 + 3 * 2 * 4
    assert Fp8Config(weight_block_size=None).quantized_nbytes(64, 64, 2) == 64 * 64 + 4
