"""The packer and unpacker of every stored layout, against independent implementations transcribed from the
reference libraries: gptqmodel's ``PackableQuantLinear.dequantize_weight`` (shift tables ``wf``, the 3-bit word
splicing) and ``convert_gptq_v1_to_v2_format_module`` (the v1 zero-point offset), AutoAWQ's ``unpack_awq`` +
``reverse_awq_order`` (GEMM) and the packing loops of ``WQLinear_GEMM``/``WQLinear_GEMV.from_linear``.
"""

from __future__ import annotations

import pytest
import torch
from qcore_gptq.formats import Decoded, Layout, decode, encode

# -- the references, transcribed ------------------------------------------------------------------------------

_WF3 = torch.tensor(
    [[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
     [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]],
    dtype=torch.int32,
).reshape(1, 3, 12)  # fmt: skip


def _rshift(values: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """gptqmodel's ``_torch_right_shift``: a logical shift of int32 words."""
    return ((values.to(torch.int64) & 0xFFFFFFFF) >> shifts.to(torch.int64)).to(torch.int32)


def _lshift(values: torch.Tensor, shift: int) -> torch.Tensor:
    return values << shift


def gptqmodel_unpack(qweight, qzeros, bits):
    """Codes [in, out] and zeros [groups, out] as gptqmodel's ``dequantize_weight`` unpacks them (v2 zeros)."""
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32).unsqueeze(0)
        pack_factor = 32 // bits
        zeros = _rshift(qzeros.unsqueeze(2).expand(-1, -1, pack_factor), wf.unsqueeze(0)) & ((1 << bits) - 1)
        zeros = zeros.reshape(qzeros.shape[0], -1)
        weight = _rshift(qweight.unsqueeze(1).expand(-1, pack_factor, -1), wf.unsqueeze(-1)) & ((1 << bits) - 1)
        return weight.reshape(-1, qweight.shape[1]), zeros
    zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
    zeros = _rshift(zeros, _WF3.unsqueeze(0))
    zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | (_lshift(zeros[:, :, 1, 0], 2) & 0x4)
    zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | (_lshift(zeros[:, :, 2, 0], 1) & 0x6)
    zeros = zeros & 0x7
    zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2)
    weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
    weight = _rshift(weight, _WF3.unsqueeze(-1)) & 0x7
    weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | (_lshift(weight[:, 1, 0], 2) & 0x4)
    weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | (_lshift(weight[:, 2, 0], 1) & 0x6)
    weight = weight & 0x7
    weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
    return weight.reshape(-1, qweight.shape[1]), zeros.reshape(qzeros.shape[0], -1)


def gptqmodel_v1_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zeros [groups, out] of v1 words as gptqmodel reads them: ``convert_gptq_v1_to_v2_format_module`` adds the
    per-field one to each word (int32 wraparound, carries included); for 3 bits it adds one per field, modulo 8."""
    if bits == 3:
        _, zeros = gptqmodel_unpack(torch.zeros(3, 1, dtype=torch.int32), qzeros, 3)
        return (zeros + 1) % 8
    constant = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[bits]
    words = (qzeros.to(torch.int64) + constant) & 0xFFFFFFFF
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return gptqmodel_unpack(torch.zeros(32 // bits, 1, dtype=torch.int32), words, bits)[1]


def autoawq_unpack_gemm(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``awq.utils.packing_utils.unpack_awq`` then ``reverse_awq_order`` and the overflow masks: [in, out]."""
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    order = torch.arange(iweights.shape[-1], dtype=torch.int32).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    return torch.bitwise_and(iweights[:, order], 15), torch.bitwise_and(izeros[:, order], 15)


def autoawq_pack(intweight: torch.Tensor, order_map: list[int], width: int | None = None) -> torch.Tensor:
    """The packing loop of ``WQLinear_GEMM``/``WQLinear_GEMV.from_linear`` (columns of ``intweight``, 8 per word)."""
    columns = intweight.shape[1]
    width = width if width is not None else columns // 8
    packed = torch.zeros((intweight.shape[0], width), dtype=torch.int32)
    for col in range((columns + 7) // 8):
        for i in range(8):
            if col * 8 + order_map[i] >= columns:
                continue
            packed[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int32) << (i * 4)
    return packed


# -- helpers --------------------------------------------------------------------------------------------------


def _layout(kind: str, bits: int, group_size: int, out_features: int, in_features: int = 256) -> Layout:
    return Layout(kind, bits, group_size, in_features, out_features)


def _random(layout: Layout, seed: int = 0) -> Decoded:
    generator = torch.Generator().manual_seed(seed)
    top = 1 << layout.bits
    codes = torch.randint(0, top, (layout.out_features, layout.in_features), generator=generator).to(torch.uint8)
    zero = torch.randint(0, top, (layout.out_features, layout.groups), generator=generator).to(torch.uint8)
    scale = torch.rand(layout.out_features, layout.groups, generator=generator).to(torch.float16)
    g_idx = (torch.arange(layout.in_features) // layout.group_size).to(torch.int32)
    return Decoded(codes, scale, zero, g_idx)


def _assert_same(a: Decoded, b: Decoded) -> None:
    for field in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


# -- tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_gptq_packing_matches_gptqmodel(bits, kind, group_size):
    layout = _layout(kind, bits, group_size, out_features=96)
    decoded = _random(layout, seed=bits)
    if kind == "gptq":  # v1 stores zero - 1: zero 0 is not representable (gptqmodel's writer wraps it too)
        decoded.zero.clamp_(min=1)
    stored = encode(layout, decoded)
    assert stored["qweight"].shape == (256 * bits // 32, 96) and stored["qweight"].dtype == torch.int32
    codes, zeros = gptqmodel_unpack(stored["qweight"], stored["qzeros"], bits)
    if kind == "gptq":
        zeros = gptqmodel_v1_zeros(stored["qzeros"], bits)
    assert torch.equal(codes.t().to(torch.uint8), decoded.codes)
    assert torch.equal(zeros.t().to(torch.uint8), decoded.zero)
    _assert_same(decode(layout, stored), decoded)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["gptq", "gptq_v2"])
def test_any_stored_words_round_trip_bit_for_bit(bits, kind):
    """Whatever int32 words a file holds (v1 words with a wrapped zero included), decode then encode rewrites them."""
    layout = _layout(kind, bits, 64, out_features=64)
    generator = torch.Generator().manual_seed(7)
    stored = {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (256 * bits // 32, 64), generator=generator, dtype=torch.int32),
        "qzeros": torch.randint(-(2**31), 2**31 - 1, (4, 64 * bits // 32), generator=generator, dtype=torch.int32),
        "scales": torch.rand(4, 64, generator=generator).to(torch.float16),
        "g_idx": (torch.arange(256) // 64).to(torch.int32),
    }
    again = encode(layout, decode(layout, stored))
    for name, tensor in stored.items():
        assert torch.equal(again[name], tensor), name


def test_v1_zero_points_are_stored_minus_one():
    layout = _layout("gptq", 4, 128, out_features=8)
    decoded = _random(layout)
    decoded.zero.fill_(8)  # symmetric 4-bit: every zero point is 8, stored as 7 in each nibble
    assert torch.equal(encode(layout, decoded)["qzeros"], torch.full((2, 1), 0x77777777, dtype=torch.int32))
    layout = _layout("gptq_v2", 4, 128, out_features=8)
    assert torch.equal(encode(layout, decoded)["qzeros"], torch.full((2, 1), -0x77777778, dtype=torch.int32))


def test_awq_gemm_packing_matches_autoawq():
    layout = Layout("awq-gemm", 4, 64, 256, 128)
    decoded = _random(layout)
    stored = encode(layout, decoded)
    codes, zeros = autoawq_unpack_gemm(stored["qweight"], stored["qzeros"])
    assert torch.equal(codes.t().to(torch.uint8), decoded.codes)
    assert torch.equal(zeros.t().to(torch.uint8), decoded.zero)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(stored["qweight"], autoawq_pack(decoded.codes.t(), order))
    assert torch.equal(stored["qzeros"], autoawq_pack(decoded.zero.t(), order))
    assert torch.equal(stored["scales"], decoded.scale.t())
    _assert_same(decode(layout, stored), decoded)


@pytest.mark.parametrize("group_size, width", [(128, 1), (64, 2), (32, 4)])
def test_awq_gemv_packing_matches_autoawq(group_size, width):
    """GEMV packs along the input in plain order; zeros and scales are padded to AutoAWQ's calculate_zeros_width."""
    layout = Layout("awq-gemv", 4, group_size, 256, 64)
    assert layout.awq_gemv_width == width
    decoded = _random(layout)
    stored = encode(layout, decoded)
    plain = list(range(8))
    assert torch.equal(stored["qweight"], autoawq_pack(decoded.codes, plain))
    assert torch.equal(stored["qzeros"], autoawq_pack(decoded.zero, plain, width=width))
    assert stored["scales"].shape == (64, 8 * width)
    assert torch.equal(stored["scales"][:, : layout.groups], decoded.scale)
    assert not stored["scales"][:, layout.groups :].any()
    _assert_same(decode(layout, stored), decoded)


def test_awq_without_zero_points_decodes_zero_eight():
    layout = Layout("awq-gemm", 4, 128, 256, 64, has_zeros=False)
    stored = encode(layout, _random(layout))
    assert "qzeros" not in stored
    assert torch.equal(decode(layout, stored).zero, torch.full((64, 2), 8, dtype=torch.uint8))
