"""The quantization formula against a plain torch reference, and each kernel against the dequantized weight.

The pinned choices: the scale is computed in float32 and stored as float16; weights are divided by that stored
scale; rounding is half to even (torch.round); an all-zero row (or one whose scale underflows float16) is all zeros.
"""

from __future__ import annotations

import pytest
import qcore
import torch
import torch.nn.functional as F
from qcore_eetq.environment import KernelChoice, choose_kernel
from qcore_eetq.linear import EetqLinear, quantize_weight
from qcore_eetq.quantize import dequantize, quantize

CPU = torch.device("cpu")


def reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = max|w| / 127 per row; q = round(w / scale) clamped to [-127, 127]; zero scale -> zero row."""
    scale = (w.float().abs().amax(dim=1) / 127).half()
    ratio = w.float() / scale.float()[:, None]
    q = torch.round(torch.nan_to_num(ratio, nan=0.0)).clamp(-127, 127)
    q[scale == 0] = 0
    return q.to(torch.int8), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_equals_the_reference_formula(dtype):
    w = (torch.randn(96, 160, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 96)[:, None]).to(
        dtype
    )
    w[5] = 0  # an all-zero row
    q, scale = quantize(w)
    expected_q, expected_scale = reference_quantize(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)
    assert (q[5] == 0).all() and scale[5] == 0
    # Every non-zero row reaches +-127 and no value is clipped: /127 maps the row maximum onto the grid's end.
    assert torch.equal(q.abs().amax(dim=1)[scale > 0], torch.full_like(q[:, 0][scale > 0], 127))


def test_ties_round_half_to_even():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 0.0]])  # scale is exactly 1.0
    q, scale = quantize(w)
    assert scale.item() == 1.0
    assert torch.equal(q.float(), torch.round(w))
    half_away_from_zero = torch.sign(w) * torch.floor(w.abs() + 0.5)
    assert not torch.equal(q.float(), half_away_from_zero)


def test_a_scale_that_underflows_float16_gives_a_zero_row():
    w = torch.full((1, 16), 1e-6)  # max/127 is below float16's smallest subnormal
    q, scale = quantize(w)
    assert scale.item() == 0 and (q == 0).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e7])
def test_weights_float16_scales_cannot_hold_are_refused(bad):
    layer = EetqLinear(16, 4, bias=False, dtype=torch.float32, transposed_checkpoint=False)
    weight = torch.randn(4, 16)
    weight[2, 3] = bad
    with pytest.raises(
        qcore.CheckpointError, match=r"tensor 'layers.0.fc.weight'.*row\(s\) \[2\].*modules_to_not_convert"
    ):
        quantize_weight(layer, "layers.0.fc", weight, torch.float32, CPU, "ckpt")


def _layer(in_features: int, out_features: int, dtype: torch.dtype, choice: KernelChoice) -> EetqLinear:
    layer = EetqLinear(in_features, out_features, bias=True, dtype=dtype, transposed_checkpoint=False)
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(in_features))
    for name, value in quantize_weight(layer, "m", weight, dtype, CPU, "ckpt").items():
        setattr(layer, name, value)
    layer.bias = torch.nn.Parameter(torch.randn(out_features).to(dtype))
    layer.ran = layer.use_kernel(choice, dtype)
    return layer


def _reference(layer: EetqLinear, x: torch.Tensor) -> torch.Tensor:
    rows = layer.state_dict()["weight"]
    return F.linear(x, dequantize(rows, layer.weight_scales, x.dtype), layer.bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cpu_float16_and_float32_dequantize_exactly_like_the_reference(dtype):
    layer = _layer(128, 64, dtype, choose_kernel(CPU, dtype, 128, 64))
    assert layer.kernel == "dequantize" and "measured faster here" in layer.ran.reason
    x = torch.randn(3, 5, 128).to(dtype)
    assert torch.equal(layer(x), _reference(layer, x))


def test_cpu_bfloat16_runs_the_int4_kernel_on_two_halves_within_its_bound():
    layer = _layer(256, 96, torch.bfloat16, choose_kernel(CPU, torch.bfloat16, 256, 96))
    assert layer.kernel == "int4pack-cpu"
    # The kernel layer holds the only copy of the codes; the parameter is a one-byte placeholder of the same shape.
    assert layer.weight.shape == (96, 256) and layer.weight.untyped_storage().nbytes() == 1
    x = torch.randn(2, 7, 256).to(torch.bfloat16)
    error = (layer(x).double() - _reference(layer, x).double()).abs()
    assert (error <= layer.packed.error_bound(x) + 1e-2 * layer.bias.double().abs()).all()


def test_cpu_bfloat16_int8pack_is_within_rounding_of_the_reference():
    layer = _layer(256, 96, torch.bfloat16, KernelChoice("int8pack", "forced"))
    assert layer.kernel == "int8pack"
    x = torch.randn(2, 7, 256).to(torch.bfloat16)
    rows = layer.state_dict()["weight"]
    exact = F.linear(x.double(), dequantize(rows, layer.weight_scales, torch.float64), layer.bias.double())
    kernel_error = (layer(x).double() - exact).abs()
    reference_error = (_reference(layer, x).double() - exact).abs()
    # Both differ from the exact product only by bfloat16 roundings of the same size: the reference rounds each
    # weight, the kernel each row's scale; each rounds its output once. Neither may be more than twice the other.
    assert kernel_error.max() <= 2 * reference_error.max()


def test_cpu_bfloat16_with_in_features_not_divisible_by_16_avoids_torchs_kernels():
    # torch 2.13's CPU bfloat16 int8 kernel returns garbage (or crashes) for in_features % 16 != 0; the int4 kernel
    # needs groups (here one per row) that are multiples of 32.
    layer = _layer(24, 64, torch.bfloat16, choose_kernel(CPU, torch.bfloat16, 24, 64))
    assert layer.kernel == "dequantize" and "divisible by 16" in layer.ran.reason
    x = torch.randn(3, 24).to(torch.bfloat16)
    assert torch.equal(layer(x), _reference(layer, x))


def test_float32_int8pack_matches_the_reference_to_float32_accumulation():
    layer = _layer(256, 64, torch.float32, KernelChoice("int8pack", "forced"))
    x = torch.randn(4, 256)
    # Scales are exact in float32 and every product x * q is exact: only the summation order differs.
    torch.testing.assert_close(layer(x), _reference(layer, x))


def test_kernel_choice_without_eetq(no_eetq):
    assert choose_kernel(CPU, torch.bfloat16, 64, 64) == KernelChoice("torch", "eetq package not installed")
    assert choose_kernel(CPU, torch.float32, 64, 64) == KernelChoice("torch", "eetq package not installed")


def test_int8pack_copes_with_activations_and_weights_off_alignment():
    # torch 2.13's CPU bfloat16 kernel crashes on x not 32-byte aligned or a weight not 16-byte aligned, as happen
    # for views and for weights read from a memory-mapped checkpoint.
    layer = _layer(128, 64, torch.bfloat16, KernelChoice("dequantize", "until the weight is moved"))
    buffer = torch.empty(layer.weight.numel() + 8, dtype=torch.int8)
    layer.weight = torch.nn.Parameter(buffer[8:].view_as(layer.weight).copy_(layer.weight), requires_grad=False)
    layer.use_kernel(KernelChoice("int8pack", "forced"), torch.bfloat16)
    x = torch.randn(3 * 128 + 8).to(torch.bfloat16)[8:].view(3, 128)
    assert x.data_ptr() % 32 and layer.weight.data_ptr() % 16 == 0
    assert torch.equal(layer(x), layer(x.clone()))
