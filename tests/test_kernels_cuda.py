"""qcore.kernels on a CUDA GPU: tinygemm int4 (and int8 as two int4 halves), torch._weight_int8pack_mm, and fp8
torch._scaled_mm, each held to the documented error bound, with exact recovery of the codes from tinygemm's tile
layout. Skipped without CUDA; the CPU paths are tests/test_kernels.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qcore.kernels import Fp8Weight, Int4Weight, Int8Weight, PackedLinear

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def int4_weight(out_features=256, in_features=512, group_size=64, zero=True) -> Int4Weight:
    generator = torch.Generator().manual_seed(0)
    groups = in_features // group_size
    return Int4Weight.from_codes(
        torch.randint(0, 16, (out_features, in_features), generator=generator),
        torch.rand(out_features, groups, generator=generator) * 0.02 + 1e-3,
        torch.rand(out_features, groups, generator=generator) * 15 if zero else None,
        group_size,
    )


def int8_weight(out_features=256, in_features=512, group_size=None, zero=False) -> Int8Weight:
    generator = torch.Generator().manual_seed(0)
    groups = in_features // (group_size or in_features)
    return Int8Weight.from_codes(
        torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8),
        torch.rand(out_features, groups, generator=generator) * 1e-3 + 1e-5,
        torch.randn(out_features, groups, generator=generator) * 4 if zero else None,
        group_size,
    )


def assert_within_bound(weight, x):
    reference = (x @ weight.dequantize(x.dtype).T).to(torch.float64)
    error = (weight.matmul(x).to(torch.float64) - reference).abs()
    bound = weight.error_bound(x)
    assert (error <= bound).all(), f"{weight.kernel}: error/bound up to {(error / bound).max():.3g}"


@pytest.mark.skipif(capability() < (8, 0), reason="tinygemm needs sm80+")
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, 512])
def test_tinygemm_int4_within_bound_and_codes_exact(group_size):
    weight = int4_weight(group_size=group_size)
    codes = weight.codes().clone()
    assert weight.select("cuda", torch.bfloat16) == "tinygemm-cuda"
    assert weight.device.type == "cuda"
    assert torch.equal(weight.codes().cpu(), codes), "codes read back through the identity are exact"
    for rows in (1, 7, 32):
        assert_within_bound(weight, torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda"))


@pytest.mark.skipif(capability() < (8, 0), reason="tinygemm needs sm80+")
def test_tinygemm_refusals_fall_back():
    odd = int4_weight(out_features=100, in_features=512)  # out_features % 8
    assert odd.select("cuda", torch.bfloat16) == "dequantize" and "out_features" in odd.reason
    x = torch.randn(3, 512, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(odd.matmul(x), F.linear(x, odd.dequantize(torch.bfloat16)))
    half = int4_weight()
    half.select("cuda", torch.float16)  # tinygemm takes bfloat16; whatever runs stays within the bound
    assert_within_bound(half, torch.randn(3, 512, dtype=torch.float16, device="cuda"))


@pytest.mark.skipif(capability() < (8, 0), reason="tinygemm needs sm80+")
@pytest.mark.parametrize(("group_size", "zero"), [(64, True), (128, False)])
def test_group_wise_int8_as_two_tinygemm_halves(group_size, zero):
    weight = int8_weight(group_size=group_size, zero=zero)
    codes = weight.codes().clone()
    assert weight.select("cuda", torch.bfloat16) == "tinygemm-cuda"
    assert torch.equal(weight.codes().cpu(), codes)
    assert_within_bound(weight, torch.randn(5, 512, dtype=torch.bfloat16, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8pack_on_cuda(dtype):
    weight = int8_weight()
    assert weight.select("cuda", dtype, batch_hint=32) == "int8pack"
    assert_within_bound(weight, torch.randn(32, 512, dtype=dtype, device="cuda"))
    assert torch.equal(weight.codes().cpu(), int8_weight().codes())


@pytest.mark.skipif(capability() < (8, 9), reason="fp8 matmul needs sm89+")
@pytest.mark.parametrize("per_row", [True, False])
def test_scaled_mm_within_bound(per_row):
    generator = torch.Generator().manual_seed(0)
    codes = (torch.randn(256, 512, generator=generator) * 40).to(torch.float8_e4m3fn)
    scale = torch.rand(256, generator=generator) * 1e-2 if per_row else torch.tensor(0.01)
    weight = Fp8Weight.from_codes(codes, scale)
    assert weight.select("cuda", torch.bfloat16) == "scaled_mm"
    x = torch.randn(16, 512, dtype=torch.bfloat16, device="cuda")
    x[0, :4] = 1e-6
    assert_within_bound(weight, x)
    assert torch.equal(weight.codes().cpu().view(torch.uint8), codes.view(torch.uint8))


@pytest.mark.skipif(capability() < (8, 9), reason="fp8 matmul needs sm89+")
def test_scaled_mm_refuses_block_scales_and_row_scales_in_float16():
    codes = (torch.randn(256, 512) * 40).to(torch.float8_e4m3fn)
    blocked = Fp8Weight.from_codes(codes, torch.rand(2, 4), block_size=(128, 128))
    assert blocked.select("cuda", torch.bfloat16) == "dequantize"
    rows = Fp8Weight.from_codes(codes, torch.rand(256))
    assert rows.select("cuda", torch.float16) == "dequantize"
    assert_within_bound(rows, torch.randn(4, 512, dtype=torch.float16, device="cuda"))


@pytest.mark.skipif(capability() < (8, 0), reason="tinygemm needs sm80+")
def test_packed_linear_moves_to_cuda_and_saves_the_same_tensors():
    layer = PackedLinear(int4_weight(), torch.randn(256))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.select("cuda", torch.bfloat16) == "tinygemm-cuda"
    assert layer.bias.is_cuda
    saved = layer.state_dict()
    assert all(torch.equal(saved[k].cpu(), v.to(saved[k].dtype)) for k, v in state.items() if k != "bias")
    x = torch.randn(2, 3, 512, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(layer(x), layer.weight.matmul(x, layer.bias))
