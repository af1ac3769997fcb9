"""GGUF's block types: their sizes, their values in torch, and the exact integer form of the three that map onto
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
from qcore_gguf.config import SUPPORTED_TYPES as SUPPORTED

__all__ = ["TYPES", "SUPPORTED", "FLOATS", "row_bytes", "dequantize", "int_form", "from_int_form", "unpermute_rows"]

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


# -- the three types that are plain group-32 integers ------------------------------------------------------------


def int_form(
    blocks: torch.Tensor, type_name: str, two_per_byte: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(codes, scale, zero)`` with ``W = (codes - zero) * scale`` per group of 32, exactly, for Q4_0/Q4_1/Q8_0.

    Q4_0: unsigned nibbles, ``zero`` None (8, the kernels' default); Q4_1 (``W = d * q + m``): ``zero = -m / d``;
    Q8_0: int8 codes, ``zero`` None (0). ``None`` for another type, or for a Q4_1 tensor with a block whose scale is
    0 but whose minimum is not (a constant block no zero point can express): it stays on the dequantize path.
    With ``two_per_byte``, Q4 codes come two a byte (``[rows, K / 2]``, column ``2i`` in the low nibble of byte
    ``i``), the form ``Int4Weight.from_two_per_byte`` takes, and no byte-per-code tensor is made.
    """
    if type_name not in ("Q4_0", "Q4_1", "Q8_0"):
        return None
    rows = blocks.shape[0]
    _, _, size = TYPES[ID[type_name]]
    b = blocks.contiguous().reshape(-1, size)
    scale = _half(b, 0)
    if type_name == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).reshape(rows, -1), scale.reshape(rows, -1), None
    # Unpacked a slice of blocks at a time into the codes: the shift-and-mask temporaries of a whole 32000 x 1024
    # weight would be twice its codes again. A block stores element j in the low nibble of byte j and element
    # j + 16 in its high nibble; two a byte, neighbours share a byte instead.
    start_byte = 4 if type_name == "Q4_1" else 2
    codes = torch.empty(b.shape[0], 16 if two_per_byte else 32, dtype=torch.uint8, device=b.device)
    step = max(1, _CHUNK_BYTES // size)
    for start in range(0, b.shape[0], step):
        values = _split(b[start : start + step, start_byte:], (0, 4), 16, 0xF)
        if two_per_byte:
            torch.bitwise_or(values[:, ::2], values[:, 1::2] << 4, out=codes[start : start + step])
        else:
            codes[start : start + step] = values
    codes = codes.reshape(rows, -1)
    if type_name == "Q4_0":
        return codes, scale.reshape(rows, -1), None
    minimum = _half(b, 2)
    if bool(((scale == 0) & (minimum != 0)).any()):
        return None
    zero = torch.where(scale == 0, 0.0, -minimum / scale)
    return codes, scale.reshape(rows, -1), zero.reshape(rows, -1)


def from_int_form(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """The GGUF blocks (uint8 ``[rows, bytes_per_row]``) :func:`int_form` read ``codes, scale, zero`` from."""
    rows = codes.shape[0]
    d = scale.reshape(-1, 1).to(torch.float16).view(torch.uint8)
    if type_name == "Q8_0":
        return torch.cat([d, codes.to(torch.int8).reshape(-1, 32).view(torch.uint8)], dim=1).reshape(rows, -1)
    nibbles = codes.to(torch.uint8).reshape(-1, 2, 16)
    packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
    if type_name == "Q4_0":
        return torch.cat([d, packed], dim=1).reshape(rows, -1)
    # 0 - zero * d, not -(zero * d): an all-zero block (a padding token's row) has m = +0, which negation would
    # turn into -0, another byte pattern.
    minimum = (0.0 - zero.reshape(-1, 1).float() * scale.reshape(-1, 1).float()).to(torch.float16).view(torch.uint8)
    return torch.cat([d, minimum, packed], dim=1).reshape(rows, -1)


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py) on whole rows.

    The converter interleaves each head's two rotary halves so llama.cpp's RoPE can pair neighbours; a row is one
    output feature, so on blocks this moves whole rows of blocks and never touches their bytes.
    """
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
