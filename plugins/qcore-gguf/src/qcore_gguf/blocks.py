"""GGUF's block types: their sizes, their values in torch, and the integer form of those that map onto
``qcore.kernels``.

Read by the reader before phase 1 (sizes, to check a file's tensor table) and during phase 4 (un-permuting Llama
q/k rows of blocks), by :class:`~qcore_gguf.layers.GgufLinear` in every forward that dequantizes, and by the
``dequantize_module`` hook. One function per type, each the torch transcription of the ``gguf`` package's numpy
``dequantize_blocks`` (``gguf/quants.py``), computed in float32 in the same order so the values are the same bits
transformers' ``gguf_file=`` load gets; the tests check every type against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qcore_gguf.config import GGML_TYPES as TYPES
from qcore_gguf.config import KERNEL_TYPES
from qcore_gguf.config import SUPPORTED_TYPES as SUPPORTED

__all__ = [
    "TYPES", "SUPPORTED", "FLOATS", "KERNEL_KINDS", "GROUP", "row_bytes", "dequantize", "int_form", "from_int_form",
    "side_bytes", "unpermute_rows",
]  # fmt: skip

ID = {name: type_id for type_id, (name, _, _) in TYPES.items()}
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def row_bytes(type_name: str, elements: int) -> int:
    """Bytes one row of ``elements`` values takes in ``type_name`` (``elements`` a multiple of the block size)."""
    _, block, size = TYPES[ID[type_name]]
    return elements // block * size


#: Bytes of blocks dequantized at a time: a large tensor (a 49k-token embedding) is done in slices, each computed in
#: float32 and written into the output in its dtype, so the float32 temporaries stay a few MiB whatever its size.
_CHUNK_BYTES = 2**20


def dequantize(blocks: torch.Tensor, type_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of GGUF blocks (uint8 ``[rows, bytes_per_row]``) -> values ``[rows, elements_per_row]`` in ``dtype``."""
    rows = blocks.shape[0]
    if type_name in FLOATS:
        return blocks.contiguous().view(FLOATS[type_name]).reshape(rows, -1).to(dtype)
    _, block, size = TYPES[ID[type_name]]
    step = max(1, _CHUNK_BYTES // max(1, blocks.shape[1]))
    if rows <= step:
        return _DEQUANTIZE[type_name](blocks.contiguous().reshape(-1, size)).reshape(rows, -1).to(dtype)
    out = torch.empty(rows, blocks.shape[1] // size * block, dtype=dtype, device=blocks.device)
    for start in range(0, rows, step):
        chunk = blocks[start : start + step].contiguous()
        out[start : start + step] = _DEQUANTIZE[type_name](chunk.reshape(-1, size)).reshape(chunk.shape[0], -1)
    return out


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _split(data: torch.Tensor, shifts: tuple[int, ...], width: int, mask: int) -> torch.Tensor:
    """``data`` read ``len(shifts)`` fields per byte, each run of ``width`` bytes giving one field per shift in turn:
    ``(n, k * width) -> (n, k * len(shifts) * width)``, the layout every ggml type packs its low bits in."""
    shift = torch.tensor(shifts, dtype=torch.uint8).reshape(1, 1, -1, 1)
    return ((data.reshape(data.shape[0], -1, 1, width) >> shift) & mask).reshape(data.shape[0], -1)


def _high_bits(data: torch.Tensor) -> torch.Tensor:
    """A little-endian 32-bit mask per block -> one bit per element (Q5_0, Q5_1)."""
    return _split(data, tuple(range(8)), 1, 1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_split(b[:, 2:], (0, 4), 16, 0xF).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _split(b[:, 4:], (0, 4), 16, 0xF).float() + _half(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _split(b[:, 6:], (0, 4), 16, 0xF) | (_high_bits(b[:, 2:6]) << 4)
    return _half(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _split(b[:, 8:], (0, 4), 16, 0xF) | (_high_bits(b[:, 4:8]) << 4)
    return _half(b, 0) * q.float() + _half(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _half(b, 0)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n, scales = b.shape[0], b[:, :16]
    dl = (_half(b, 80) * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (_half(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _split(b[:, 16:80], (0, 2, 4, 6), 32, 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _split(b[:, 96:104], (0, 4), 8, 0xF)
    high = _split(b[:, 104:108], (0, 2, 4, 6), 4, 3)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_half(b, 108) * scales).reshape(n, 16, 1)
    ql = _split(b[:, 32:96], (0, 2, 4, 6), 32, 3).reshape(n, 16, 16)
    qh = _split(b[:, :32], tuple(range(8)), 32, 1).reshape(n, 16, 16) ^ 1  # the offset applies where the bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, 256)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and minimums of a Q4_K/Q5_K block (bytes 4..16)."""
    d, m, m_d = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    scale = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    minimum = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scale.float(), minimum.float()


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A Q4_K/Q5_K block's values from its codes ``q`` (n, 256): eight sub-blocks of ``d * scale * q - dm * min``."""
    n = b.shape[0]
    scale, minimum = _k_scales(b)
    d = (_half(b, 0) * scale).reshape(n, 8, 1)
    dm = (_half(b, 2) * minimum).reshape(n, 8, 1)
    return (d * q.reshape(n, 8, 32).float() - dm).reshape(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_affine(b, _split(b[:, 16:], (0, 4), 32, 0xF))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    return _k_affine(b, _split(b[:, 48:], (0, 4), 32, 0xF) | (_split(b[:, 16:48], tuple(range(8)), 32, 1) << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = (_half(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    ql = _split(b[:, :128], (0, 4), 64, 0xF).reshape(n, 8, 32)
    qh = _split(b[:, 128:192], (0, 2, 4, 6), 32, 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, 256)


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}  # fmt: skip


# -- the types whose groups of 32 are plain integers ---------------------------------------------------------------

#: Block types with an integer form, and the ``qcore.kernels`` weight kind that takes it.
KERNEL_KINDS = {name: "int4" if name.startswith("Q4") else "int8" for name in KERNEL_TYPES}
#: Elements per scale: 32, but Q6_K's sixteen sub-blocks of 16 (no int kernel of torch's takes those).
GROUP = {name: 16 if name == "Q6_K" else 32 for name in KERNEL_TYPES}
#: What a type's unsigned codes are stored with added (the int8 form subtracts it: codes centred on 0).
_CODE_OFFSET = {"Q5_0": 16, "Q6_K": 32}
#: Where each type's codes start in its block (Q4_K: after its 16-byte header of scales).
_CODES_AT = {"Q4_0": 2, "Q4_1": 4, "Q4_K": 16, "Q5_0": 6, "Q5_1": 8}
#: The bytes of a block that its float scales do not keep exactly, kept beside the codes: Q4_K's header (d, dmin and
#: the packed 6-bit scales and minimums), Q6_K's int8 scales and d.
_SIDE_BYTES = {"Q4_K": (0, 16), "Q6_K": (192, 210)}


def int_form(
    blocks: torch.Tensor, type_name: str, two_per_byte: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(codes, scale, zero)`` with ``W = (codes - zero) * scale`` per group of :data:`GROUP` elements, for the
    types of :data:`KERNEL_KINDS`: the same integer codes, and statistics equal to the block's or one float rounding
    from it.

    Q4_0: unsigned nibbles, ``zero`` None (8, the kernels' default). Q4_1 (``W = d * q + m``): ``zero = -m / d``.
    Q4_K: per 32-element sub-block ``scale = d * sc``, ``zero = dmin * mn / scale``. Q5_0: int8 codes ``q - 16``,
    ``zero`` None. Q5_1: int8 codes ``q``, ``zero = -m / d``. Q6_K: int8 codes ``q - 32``, per 16-element sub-block
    ``scale = d * sc``, ``zero`` None. Q8_0: int8 codes, ``zero`` None (0). The block bytes Q4_K's and Q6_K's float
    scales do not keep exactly are :func:`side_bytes`. ``None`` for another type, or for a tensor with a group whose
    scale is 0 but whose minimum is not (a constant group no zero point can express): it stays on the dequantize
    path. With ``two_per_byte``, 4-bit codes come two a byte (``[rows, K / 2]``, column ``2i`` in the low nibble of
    byte ``i``), the form ``Int4Weight.from_two_per_byte`` takes, and no byte-per-code tensor is made.
    """
    if type_name not in KERNEL_KINDS:
        return None
    rows = blocks.shape[0]
    _, block, size = TYPES[ID[type_name]]
    b = blocks.contiguous().reshape(-1, size)
    if type_name == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).reshape(rows, -1), _half(b, 0).reshape(rows, -1), None
    if type_name == "Q4_K":
        sc, mn = _k_scales(b)
        scale, minimum = _half(b, 0) * sc, _half(b, 2) * mn  # W = scale * q - minimum, per sub-block
    elif type_name == "Q6_K":
        scale, minimum = _half(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float(), None
    else:
        scale = _half(b, 0)
        minimum = -_half(b, 2) if type_name in ("Q4_1", "Q5_1") else None
    if minimum is not None and bool(((scale == 0) & (minimum != 0)).any()):
        return None
    zero = None if minimum is None else torch.where(scale == 0, 0.0, minimum / scale)
    four_bit = KERNEL_KINDS[type_name] == "int4"
    # Unpacked a slice of blocks at a time into the codes: the shift-and-mask temporaries of a whole 32000 x 1024
    # weight would be twice its codes again. A block stores its low nibbles in halves (element j and j + 16 share
    # a byte, or j and j + 32 in Q4_K); two a byte, neighbours share a byte instead.
    width = block // 2 if four_bit and two_per_byte else block
    codes = torch.empty(b.shape[0], width, dtype=torch.uint8 if four_bit else torch.int8, device=b.device)
    step = max(1, _CHUNK_BYTES // size)
    for start in range(0, b.shape[0], step):
        values = _codes(b[start : start + step], type_name)
        if four_bit and two_per_byte:
            torch.bitwise_or(values[:, ::2], values[:, 1::2] << 4, out=codes[start : start + step])
        else:
            codes[start : start + step] = values.to(codes.dtype) - _CODE_OFFSET.get(type_name, 0)
    return codes.reshape(rows, -1), scale.reshape(rows, -1), None if zero is None else zero.reshape(rows, -1)


def _codes(b: torch.Tensor, type_name: str) -> torch.Tensor:
    """A slice of blocks' unsigned codes, ``[blocks, elements]`` in element order."""
    if type_name == "Q6_K":
        n = b.shape[0]
        low = _split(b[:, :128], (0, 4), 64, 0xF).reshape(n, 8, 32)
        high = _split(b[:, 128:192], (0, 2, 4, 6), 32, 3).reshape(n, 8, 32)
        return (low | (high << 4)).reshape(n, 256)
    low = _split(b[:, _CODES_AT[type_name] :], (0, 4), 32 if type_name == "Q4_K" else 16, 0xF)
    if type_name in ("Q5_0", "Q5_1"):
        start = _CODES_AT[type_name] - 4
        return low | (_high_bits(b[:, start : start + 4]) << 4)
    return low


def side_bytes(blocks: torch.Tensor, type_name: str) -> torch.Tensor | None:
    """The bytes of each block of ``blocks`` (``[rows, bytes_per_row]``) that :func:`from_int_form` needs beside the
    codes (:data:`_SIDE_BYTES`), ``[rows, blocks_per_row * width]``; ``None`` for a type whose scales are exact."""
    if type_name not in _SIDE_BYTES:
        return None
    (start, stop), size, rows = _SIDE_BYTES[type_name], TYPES[ID[type_name]][2], blocks.shape[0]
    return blocks.reshape(rows, -1, size)[:, :, start:stop].reshape(rows, -1).clone()


def from_int_form(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    type_name: str,
    side: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GGUF blocks (uint8 ``[rows, bytes_per_row]``) :func:`int_form` read ``codes, scale, zero`` from (for
    Q4_K and Q6_K with ``side``, :func:`side_bytes` of the same rows; their ``scale`` and ``zero`` are not used)."""
    rows = codes.shape[0]
    if type_name == "Q6_K":
        q = (codes.to(torch.int16) + _CODE_OFFSET[type_name]).to(torch.uint8)
        low = q.reshape(-1, 2, 2, 64)
        packed_low = ((low[:, :, 0] & 15) | ((low[:, :, 1] & 15) << 4)).reshape(-1, 128)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=q.device).reshape(1, 1, 4, 1)
        high = (((q.reshape(-1, 2, 4, 32) >> 4) & 3).to(torch.int32) << shifts).sum(2).to(torch.uint8).reshape(-1, 64)
        return torch.cat([packed_low, high, side.reshape(-1, 18)], dim=1).reshape(rows, -1)
    if type_name == "Q4_K":
        q = codes.to(torch.uint8).reshape(-1, 4, 2, 32)
        packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
        return torch.cat([side.reshape(-1, 16), packed], dim=1).reshape(rows, -1)
    d = scale.reshape(-1, 1).to(torch.float16).view(torch.uint8)
    if type_name == "Q8_0":
        return torch.cat([d, codes.to(torch.int8).reshape(-1, 32).view(torch.uint8)], dim=1).reshape(rows, -1)
    q = (codes.to(torch.int16) + _CODE_OFFSET.get(type_name, 0)).to(torch.uint8).reshape(-1, 2, 16)
    parts = [d]
    if type_name in ("Q4_1", "Q5_1"):
        # 0 - zero * d, not -(zero * d): an all-zero block (a padding token's row) has m = +0, which negation
        # would turn into -0, another byte pattern.
        minimum = 0.0 - zero.reshape(-1, 1).float() * scale.reshape(-1, 1).float()
        parts.append(minimum.to(torch.float16).view(torch.uint8))
    if type_name in ("Q5_0", "Q5_1"):
        high = (q.reshape(-1, 4, 8) >> 4).to(torch.int32) << torch.arange(8, dtype=torch.int32, device=q.device)
        parts.append(high.sum(-1).to(torch.uint8))  # bit j of the little-endian mask: element j's fifth bit
    parts.append((q[:, 0] & 15) | ((q[:, 1] & 15) << 4))
    return torch.cat(parts, dim=1).reshape(rows, -1)


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py) on whole rows.

    The converter interleaves each head's two rotary halves so llama.cpp's RoPE can pair neighbours; a row is one
    output feature, so on blocks this moves whole rows of blocks and never touches their bytes.
    """
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
