"""qcore.kernels on CPU: exact recovery of codes from every layout, each kernel held to its documented error bound,
fallbacks that never raise, and PackedLinear's forward and state_dict. CUDA paths: tests/test_kernels_cuda.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from qcore.kernels import KERNELS, Fp8Weight, Int4Weight, Int8Weight, PackedLinear, describe

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def int4_weight(out_features, in_features, group_size, zero=True, seed=0) -> Int4Weight:
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // (group_size or in_features)
    return Int4Weight.from_codes(
        torch.randint(0, 16, (out_features, in_features), generator=generator),
        torch.rand(out_features, groups, generator=generator) * 0.02 + 1e-3,
        torch.rand(out_features, groups, generator=generator) * 15 if zero else None,
        group_size,
    )


def int8_weight(out_features, in_features, group_size=None, zero=False, seed=0) -> Int8Weight:
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // (group_size or in_features)
    return Int8Weight.from_codes(
        torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8),
        torch.rand(out_features, groups, generator=generator) * 1e-3 + 1e-5,
        torch.randn(out_features, groups, generator=generator) * 4 if zero else None,
        group_size,
    )


def fp8_weight(out_features, in_features, per_row=True, seed=0) -> Fp8Weight:
    generator = torch.Generator().manual_seed(seed)
    codes = (torch.randn(out_features, in_features, generator=generator) * 40).to(torch.float8_e4m3fn)
    scale = torch.rand(out_features, generator=generator) * 1e-2 if per_row else torch.tensor(0.01)
    return Fp8Weight.from_codes(codes, scale)


def assert_within_bound(weight, x):
    """``weight.matmul(x)`` lies within ``error_bound`` of the exact dequantized matmul, for every element."""
    reference = (x @ weight.dequantize(x.dtype).T).to(torch.float64)
    error = (weight.matmul(x).to(torch.float64) - reference).abs()
    bound = weight.error_bound(x)
    assert error.shape == bound.shape
    assert (error <= bound).all(), f"{weight.kernel}: error/bound up to {(error / bound).max():.3g}"


# -- int4 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"),
    [(112, 256, 64), (64, 128, None), (48, 512, 512), (16, 64, 32), (128, 96, 32), (192, 256, 256)],
)
def test_int4_codes_survive_the_cpu_kernel_layout(out_features, in_features, group_size):
    """112 rows: one full block of 64 and a 48-row tail; 512: a group larger than the kernel's, repeated."""
    weight = int4_weight(out_features, in_features, group_size)
    codes, scale, zero = weight.codes().clone(), weight.scale.clone(), weight.zero.clone()
    assert weight.select("cpu", torch.bfloat16) == "int4pack-cpu"
    assert torch.equal(weight.codes(), codes)
    assert torch.equal(weight.scale, scale) and torch.equal(weight.zero, zero)
    assert weight._nibbles is None, "the kernel layout replaces the plain codes: one copy only"


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_int4_inverse_of_the_other_cpu_layouts(capability):
    """torch packs differently without AVX-512; ATEN_CPU_CAPABILITY makes this machine use those layouts."""
    probe = (
        "import torch; from qcore import kernels;"
        "w = kernels.Int4Weight.from_codes(torch.randint(0, 16, (112, 128)), torch.rand(112, 2), None, 64);"
        "c = w.codes().clone(); k = w.select('cpu', torch.bfloat16);"
        "print(torch.backends.cpu.get_cpu_capability(), kernels._cpu_int4_layout(), k, torch.equal(w.codes(), c))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    reported, layout, kernel, exact = result.stdout.split()
    assert layout == {"AVX2": "avx2"}.get(reported, "pairs")
    assert (kernel, exact) == ("int4pack-cpu", "True")


@pytest.mark.parametrize("layout", ["avx512", "avx2", "pairs"])
@pytest.mark.parametrize("out_features", [64, 112, 96, 32, 48, 130])
def test_rows_read_from_each_cpu_layout_are_those_of_the_full_unpacking(layout, out_features):
    """A tied embedding looks tokens up as rows of its head's packed codes; full blocks and the tail alike."""
    from qcore.kernels import _int4_cpu_rows, _unpack_int4_cpu

    packed = torch.randint(
        0, 256, (out_features * 96 // 2,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    rows = torch.tensor([0, out_features - 1, out_features // 2, 5, 5, 33 % out_features, 63 % out_features])
    assert torch.equal(_int4_cpu_rows(packed, rows, out_features, 96, layout),
                       _unpack_int4_cpu(packed, out_features, 96, layout)[rows])  # fmt: skip


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("kernel", ["dequantize", "int4pack-cpu"])
def test_row_codes_are_the_codes_of_those_rows_under_every_kernel(kind, kernel):
    generator = torch.Generator().manual_seed(1)
    if kind == "int4":
        codes = torch.randint(0, 16, (4160, 64), generator=generator, dtype=torch.uint8)
        weight = Int4Weight.from_codes(codes, torch.rand(4160, 2) + 0.1, None, 32)
    else:
        codes = torch.randint(-128, 128, (4160, 64), generator=generator, dtype=torch.int8)
        weight = Int8Weight.from_codes(codes, torch.rand(4160, 2) + 0.1, None, 32)
    weight.select("cpu", torch.bfloat16, kernel=kernel)
    rows = torch.tensor([4159, 0, 64, 4096, 4100, 7, 7])
    assert torch.equal(weight.row_codes(rows), codes[rows])


def test_packing_a_large_weight_in_slices_gives_torchs_layout():
    """The CPU int4 layout is packed a few thousand rows at a time (bounding its int32 temporary): same bytes."""
    from qcore.kernels import _pack_int4

    codes = torch.randint(0, 16, (8192 + 48, 576), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    ones, zeros = torch.ones(codes.shape[0], 18), torch.zeros(codes.shape[0], 18)
    assert torch.equal(_pack_int4(codes.to(torch.uint8), ones, zeros, 32, "int4pack-cpu", torch.bfloat16).packed, whole)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero", [True, False])
def test_int4_kernel_within_bound(dtype, zero):
    weight = int4_weight(112, 256, 64, zero=zero)
    assert weight.select("cpu", dtype, kernel="int4pack-cpu") == "int4pack-cpu"
    assert_within_bound(weight, torch.randn(5, 256, dtype=dtype))
    assert_within_bound(weight, torch.randn(2, 3, 256, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cpu_int4_kernel_is_chosen_for_bfloat16_only(dtype):
    """It runs a scalar loop for other dtypes, far slower than dequantizing."""
    assert int4_weight(64, 128, 64).select("cpu", dtype) == "dequantize"
    assert int8_weight(64, 128, 64).select("cpu", dtype) == "dequantize"
    assert int8_weight(64, 128, 64).select("cpu", torch.bfloat16) == "int4pack-cpu"


def test_int4_kernel_bound_is_close_to_the_zero_rounding():
    """The bound is not vacuous: the kernel's error is a sizeable part of it (it is the rounding of the zeros)."""
    weight = int4_weight(256, 512, 64)
    weight.select("cpu", torch.bfloat16)
    x = torch.randn(8, 512, dtype=torch.bfloat16)
    error = (weight.matmul(x).double() - (x @ weight.dequantize(torch.bfloat16).T).double()).abs()
    assert (error / weight.error_bound(x)).max() > 0.01


@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size", "why"),
    [(40, 128, 32, "multiple of 16"), (64, 256, 16, "multiple of 32"), (64, 96, 48, "multiple of 32")],
)
def test_int4_falls_back_to_dequantize(out_features, in_features, group_size, why):
    weight = int4_weight(out_features, in_features, group_size)
    codes = weight.codes().clone()
    assert weight.select("cpu", torch.bfloat16) == "dequantize"
    assert why in weight.reason
    x = torch.randn(3, in_features, dtype=torch.bfloat16)
    assert torch.equal(weight.matmul(x), F.linear(x, weight.dequantize(torch.bfloat16)))
    assert torch.equal(weight.codes(), codes)
    with pytest.raises(ValueError, match="multiple of"):
        weight.select("cpu", torch.bfloat16, kernel="int4pack-cpu")


def test_int4_dequantize_is_the_affine_formula():
    codes = torch.tensor([[0, 15, 8, 3]])
    weight = Int4Weight.from_codes(codes, torch.tensor([[0.5, 2.0]]), torch.tensor([[8.0, 1.5]]), group_size=2)
    expected = torch.tensor([[(0 - 8) * 0.5, (15 - 8) * 0.5, (8 - 1.5) * 2.0, (3 - 1.5) * 2.0]])
    assert torch.equal(weight.dequantize(), expected)
    symmetric = Int4Weight.from_codes(codes, torch.tensor([[1.0]]))
    assert torch.equal(symmetric.dequantize(), (codes - 8).float())


def test_a_call_in_another_dtype_is_exact_not_fast():
    weight = int4_weight(64, 128, 64)
    weight.select("cpu", torch.bfloat16)
    x = torch.randn(2, 128)
    assert torch.equal(weight.matmul(x), F.linear(x, weight.dequantize(torch.float32)))


@pytest.mark.parametrize(
    ("kind", "arguments", "message"),
    [
        (Int4Weight, (torch.full((4, 8), 16), torch.ones(4, 1)), "0..15"),
        (Int4Weight, (torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 3)), "one value per output row and group"),
        (Int4Weight, (torch.zeros(4, 7, dtype=torch.uint8), torch.ones(4, 1)), "even in_features"),
        (Int4Weight, (torch.zeros(4, 8), torch.ones(4, 1)), "integer tensor"),
        (Int8Weight, (torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4)), "must be int8"),
        (Int8Weight, (torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1, dtype=torch.int32)), "float tensor"),
        (Fp8Weight, (torch.zeros(4, 8).to(torch.float8_e4m3fn), torch.ones(2)), "neither per-tensor"),
    ],
)
def test_from_codes_rejects_what_does_not_fit(kind, arguments, message):
    with pytest.raises(ValueError, match=message):
        kind.from_codes(*arguments)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide"):
        Int4Weight.from_codes(torch.zeros(4, 96, dtype=torch.uint8), torch.ones(4, 2), group_size=64)


def test_gradients_flow_through_the_kernel_to_activations_and_bias():
    """Adapters (LoRA) train through a frozen packed weight: d(x @ W.T + b)/dx = grad @ W, d/db = sum(grad)."""
    weight = int4_weight(64, 128, 64)
    weight.select("cpu", torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(3, 64, dtype=torch.bfloat16)
    weight.matmul(x, bias).backward(grad)
    assert torch.equal(x.grad, grad @ weight.dequantize(torch.bfloat16))
    assert torch.equal(bias.grad, grad.sum(0))


# -- int8 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("group_size", "zero"), [(None, False), (None, True), (64, True), (32, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_as_two_int4_halves(group_size, zero, dtype):
    weight = int8_weight(64, 256, group_size, zero)
    codes = weight.codes().clone()
    assert weight.select("cpu", dtype, batch_hint=1, kernel="int4pack-cpu") == "int4pack-cpu"
    assert torch.equal(weight.codes(), codes)
    assert weight._codes is None, "the two halves replace the int8 codes"
    assert_within_bound(weight, torch.randn(3, 256, dtype=dtype))


def test_int8pack_for_symmetric_rows_at_larger_batches():
    weight = int8_weight(64, 256)
    assert weight.select("cpu", torch.bfloat16, batch_hint=32) == "int8pack"
    assert_within_bound(weight, torch.randn(32, 256, dtype=torch.bfloat16))
    assert torch.equal(weight.codes(), int8_weight(64, 256).codes())


def test_int8pack_survives_misaligned_tensors():
    """torch 2.13's CPU kernel crashes on tensors off a 64-byte boundary: the layer copies them first."""
    base = int8_weight(64, 256)
    storage = torch.empty(64 * 256 + 1, dtype=torch.int8)
    storage[1:] = base.codes().reshape(-1)
    codes = storage[1:].view(64, 256)
    assert codes.data_ptr() % 64
    weight = Int8Weight.from_codes(codes, base.scale)
    weight.select("cpu", torch.bfloat16, kernel="int8pack")
    activations = torch.empty(3 * 256 + 1, dtype=torch.bfloat16)
    x = activations[1:].view(3, 256).normal_()
    assert_within_bound(weight, x)


def test_int8pack_refuses_what_crashes_torch():
    """K not divisible by 16 on CPU, groups, zero points; float16 runs when asked but dequantizing is faster."""
    assert "divisible by 16" in _refusal(int8_weight(64, 200), torch.bfloat16)
    assert int8_weight(64, 256).select("cpu", torch.float16, batch_hint=32) == "dequantize"
    assert int8_weight(64, 256).select("cpu", torch.float16, kernel="int8pack") == "int8pack"
    assert "one scale per row" in _refusal(int8_weight(64, 256, 64), torch.bfloat16)
    assert "symmetric" in _refusal(int8_weight(64, 256, zero=True), torch.bfloat16)
    weight = int8_weight(64, 200)
    assert weight.select("cpu", torch.bfloat16, batch_hint=32) == "dequantize"
    assert_within_bound(weight, torch.randn(4, 200, dtype=torch.bfloat16))


def _refusal(weight, dtype) -> str:
    with pytest.raises(ValueError) as error:
        weight.select("cpu", dtype, kernel="int8pack")
    return str(error.value)


# -- fp8 -----------------------------------------------------------------------------------------------------------


def test_fp8_dequantizes_on_cpu_where_scaled_mm_is_slower():
    weight = fp8_weight(64, 128)
    assert weight.select("cpu", torch.bfloat16) == "dequantize"
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(weight.matmul(x), F.linear(x, weight.dequantize(torch.bfloat16)))


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_scaled_mm_within_bound(per_row, dtype):
    """Activations quantized to e4m3 per row (or per tensor): the bound includes their rounding, tiny values too."""
    weight = fp8_weight(64, 128, per_row)
    assert weight.select("cpu", dtype, kernel="scaled_mm") == "scaled_mm"
    x = torch.randn(4, 128, dtype=dtype)
    x[0, :5] = 1e-6
    assert_within_bound(weight, x)


def test_fp8_block_scales():
    codes = (torch.randn(48, 80) * 40).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3)
    weight = Fp8Weight.from_codes(codes, scale, block_size=(32, 32))
    expected = codes.float() * scale.repeat_interleave(32, 0)[:48].repeat_interleave(32, 1)[:, :80]
    assert torch.equal(weight.dequantize(), expected)
    assert weight.select("cpu", torch.bfloat16) == "dequantize"
    with pytest.raises(ValueError, match="block"):
        weight.select("cpu", torch.bfloat16, kernel="scaled_mm")
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        Fp8Weight.from_codes(codes, torch.rand(3, 3), block_size=(32, 32))


# -- memory and the module -------------------------------------------------------------------------------------------


def test_an_int4_weight_from_codes_two_a_byte_is_the_same_weight():
    reference = int4_weight(64, 128, 32)
    nibbles = reference._nibbles.clone()
    weight = Int4Weight.from_two_per_byte(nibbles, reference.scale, reference.zero, 32)
    assert weight._nibbles is nibbles  # held as given: no byte-per-code copy
    assert torch.equal(weight.codes(), reference.codes()) and weight.nbytes == reference.nbytes
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    for w in (weight, reference):
        w.select("cpu", torch.bfloat16)
    assert torch.equal(weight.matmul(x), reference.matmul(x))
    with pytest.raises(ValueError, match="must be uint8"):
        Int4Weight.from_two_per_byte(nibbles.to(torch.int32), reference.scale)
    with pytest.raises(ValueError, match="does not divide"):
        Int4Weight.from_two_per_byte(nibbles, reference.scale, None, 48)


def test_nbytes_counts_one_copy_of_the_codes():
    weight = int4_weight(256, 512, 64)
    before = weight.nbytes
    assert before == 256 * 512 // 2 + 2 * 256 * 8 * 4
    weight.select("cpu", torch.bfloat16)
    # Kernel layout (same 4 bits a weight) + scales-and-zeros in bfloat16 beside the exact float32 statistics.
    assert weight.nbytes == before + 256 * 8 * 2 * 2
    int8 = int8_weight(256, 512, 64, zero=True)
    plain = int8.nbytes
    int8.select("cpu", torch.bfloat16)
    assert int8.nbytes == plain + 2 * 256 * 8 * 2 * 2


@pytest.mark.parametrize(
    "make",
    [lambda: int4_weight(64, 128, 64), lambda: int8_weight(64, 128, 64, zero=True), lambda: int8_weight(64, 128)],
)
def test_packed_linear_state_dict_round_trip(make):
    weight = make()
    codes, scale = weight.codes().clone(), weight.scale.clone()
    layer = PackedLinear(weight, torch.randn(64))
    assert layer.select("cpu", torch.bfloat16) != "dequantize"
    state = layer.state_dict()
    assert torch.equal(state["weight_codes"], codes) and torch.equal(state["weight_scale"], scale)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    expected = layer(x)
    assert torch.equal(expected, weight.matmul(x, layer.bias))

    fresh = PackedLinear(make(), torch.zeros(64))
    fresh.select("cpu", torch.bfloat16)
    fresh.load_state_dict(state)
    assert fresh.weight.kernel == layer.weight.kernel
    assert torch.equal(fresh(x), expected)
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in state.items())


def test_packed_linear_reports_missing_tensors():
    layer = PackedLinear(int4_weight(64, 128, 64))
    with pytest.raises(RuntimeError, match="weight_codes"):
        layer.load_state_dict({"weight_scale": layer.weight.scale})


def test_describe_counts_kernels():
    fast, slow = int4_weight(64, 128, 64), int4_weight(40, 128, 64)
    fast.select("cpu", torch.bfloat16)
    slow.select("cpu", torch.bfloat16)
    assert describe([fast]) == KERNELS["int4pack-cpu"]
    assert describe([fast, fast, slow]) == (
        f"{KERNELS['dequantize']} for 1 modules; {KERNELS['int4pack-cpu']} for 2 modules"
    )
