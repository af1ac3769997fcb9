"""The block table in torch against the gguf package's own numpy code, bit for bit, for every type qcore-gguf loads;
the int4/int8 form of the types that map onto qcore.kernels; the q/k un-permutation against llama.cpp's own."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_files import HAND_MADE, hand_made_blocks, permute
from qcore_gguf import blocks
from qcore_gguf.config import GGML_TYPES, KERNEL_TYPES, SUPPORTED_TYPES, WRITABLE_TYPES
from qcore_gguf.reader import GgufReader


def stored_rows(type_name: str, rows: int = 6, cols: int = 512) -> np.ndarray:
    """Blocks of ``type_name``: written by gguf's quantizer where it has one, made by hand for the K-quants."""
    rng = np.random.default_rng(7)
    if type_name in HAND_MADE:
        return hand_made_blocks(type_name, rows, cols, rng)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(values, gguf.GGMLQuantizationType[type_name])).view(np.uint8)


def test_type_table_is_gguf_own():
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)] == (qtype.name, block, size)
    assert set(WRITABLE_TYPES) <= set(SUPPORTED_TYPES)


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantize_matches_gguf_bit_for_bit(type_name):
    rows = stored_rows(type_name).reshape(6, -1)
    qtype = gguf.GGMLQuantizationType[type_name]
    view = {"F32": np.float32, "F16": np.float16}.get(type_name)
    expected = gguf.quants.dequantize(rows.view(view) if view else rows, qtype).reshape(6, -1)
    ours = blocks.dequantize(torch.from_numpy(rows), type_name)
    assert ours.dtype == torch.float32 and ours.shape == (6, 512)
    assert np.array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("type_name", HAND_MADE)
def test_k_quants_read_from_a_file_match_gguf_reader(gguf_file, type_name):
    """Blocks read through qcore-gguf's reader dequantize to what gguf's own GGUFReader + dequantize give."""
    path = gguf_file("qwen2", type_name)
    ours = GgufReader(path)
    theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    name = "model.layers.1.mlp.down_proj.weight"
    stored = theirs[ours.stored[name][0]]
    assert ours.tensors[name].dtype == type_name
    expected = gguf.quants.dequantize(stored.data, stored.tensor_type)
    assert np.array_equal(blocks.dequantize(ours.read(name), type_name).numpy(), expected)


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
def test_int_form_is_exact_and_reencodes_to_the_same_bytes(type_name):
    rows = torch.from_numpy(stored_rows(type_name))
    codes, scale, zero = blocks.int_form(rows, type_name)
    assert codes.dtype == (torch.uint8 if blocks.KERNEL_KINDS[type_name] == "int4" else torch.int8)
    side = blocks.side_bytes(rows, type_name)
    assert (side is not None) == (type_name in ("Q4_K", "Q6_K"))
    assert torch.equal(blocks.from_int_form(codes, scale, zero, type_name, side), rows)
    grouped = codes.double().reshape(6, -1, blocks.GROUP[type_name])
    offset = 8 if type_name == "Q4_0" else 0 if zero is None else zero.double().unsqueeze(-1)
    weight = ((grouped - offset) * scale.double().unsqueeze(-1)).reshape(6, -1)
    reference = blocks.dequantize(rows, type_name).double()
    if zero is None:  # Q4_0, Q5_0, Q6_K, Q8_0: d * (q - offset), the same product
        assert torch.equal(weight.float().double(), reference)
    # Q4_1/Q5_1's W = d * q + m and Q4_K's d * sc * q - dmin * mn rewritten as (q - zero) * scale move each weight
    # by float rounding only.
    assert (weight - reference).abs().max() <= 1e-6 * reference.abs().max()


def test_q4_k_with_a_constant_sub_block_has_no_int_form():
    rows = torch.from_numpy(stored_rows("Q4_K")).clone()
    rows[0, 4] &= 0xC0  # sub-block 0's 6-bit scale 0, its minimum not: a constant no (q - zero) * scale expresses
    assert blocks.int_form(rows, "Q4_K") is None


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_int_form_two_a_byte_is_the_weight_s_own_form(type_name):
    from qcore.kernels import Int4Weight

    rows = torch.from_numpy(stored_rows(type_name))
    codes, scale, zero = blocks.int_form(rows, type_name)
    nibbles, scale_too, zero_too = blocks.int_form(rows, type_name, two_per_byte=True)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (codes.shape[0], codes.shape[1] // 2)
    assert torch.equal(scale, scale_too) and (zero is None) == (zero_too is None)
    direct = Int4Weight.from_two_per_byte(nibbles, scale, zero, group_size=32)
    assert torch.equal(direct.codes(), Int4Weight.from_codes(codes, scale, zero, group_size=32).codes())


def test_q4_1_with_a_zero_scale_and_nonzero_minimum_has_no_int_form():
    rows = torch.from_numpy(stored_rows("Q4_1")).clone()
    rows[0, 0:2] = 0  # d = 0, m != 0: a constant block no (q - zero) * d can express
    assert blocks.int_form(rows, "Q4_1") is None


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permutation(heads):
    rows = torch.arange(16 * 5 * heads).reshape(16 * heads, 5)
    assert torch.equal(blocks.unpermute_rows(torch.from_numpy(permute(rows.numpy(), heads, heads)), heads), rows)
