"""The stored forms of GPTQ and AWQ modules: which tensors, of which shapes, and how their int32 words hold codes.

Used in phase 3 (``preprocess_model``: :func:`expected_tensors` checks every stored tensor's shape and dtype from
the checkpoint header, before any weight is read) and phase 4 (``load_weight``: :func:`decode` turns a module's
tensors into codes, scales and zero points), and by saving (:func:`encode`, the exact inverse of :func:`decode`).

Every layout is an int32 word holding ``32 / bits`` codes, least significant first, along one dimension; 3-bit
codes run across word boundaries as one little-endian bit stream of 3 words per 32 codes (gptqmodel's layout).

* GPTQ (gptqmodel, AutoGPTQ): ``qweight`` [in * bits / 32, out] packed along the input features; ``qzeros``
  [groups, out * bits / 32] and ``scales`` [groups, out] (fp16); ``g_idx`` [in] int32, the group of each input
  feature. Format ``gptq`` (v1) stores each zero point minus one as an integer subtraction on the packed word
  (gptqmodel's ``convert_gptq_v2_to_v1_format``; 3-bit field by field), ``gptq_v2`` stores it as is.
* AWQ ``gemm`` (AutoAWQ ``WQLinear_GEMM``): ``qweight`` [in, out / 8] and ``qzeros`` [groups, out / 8] packed along
  the output features, word position ``i`` holding feature ``8 * word + AWQ_ORDER[i]``; ``scales`` [groups, out].
* AWQ ``gemv`` (``WQLinear_GEMV``): ``qweight`` [out, in / 8] packed along the input features in plain order;
  ``qzeros`` [out, width] and ``scales`` [out, 8 * width], padded with zeros to ``width`` (AutoAWQ's
  ``calculate_zeros_width``).

Dequantized: ``W[o, i] = (q[o, i] - zero[o, group(i)]) * scale[o, group(i)]``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["Layout", "Decoded", "AWQ_ORDER", "expected_tensors", "decode", "encode", "pack", "unpack"]

#: AutoAWQ's packing order within a word (``awq.utils.packing_utils.AWQ_ORDER``); its inverse is AWQ_REVERSE_ORDER.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_MASK32 = (1 << 32) - 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one module's tensors are stored: the format, its bits, the group size resolved against the module."""

    #: ``gptq``, ``gptq_v2``, ``awq-gemm`` or ``awq-gemv``.
    kind: str
    bits: int
    #: Input features per group (``-1`` already resolved to ``in_features``).
    group_size: int
    in_features: int
    out_features: int
    #: Whether zero points are stored (AWQ without ``zero_point`` may omit ``qzeros``; the zero is then 8).
    has_zeros: bool = True

    @property
    def groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    @property
    def awq_gemv_width(self) -> int:
        """AutoAWQ's ``calculate_zeros_width``: groups rounded up to whole words, then to 2 or 4 words below g128."""
        multiplier = 1 if self.group_size >= 128 else {64: 2, 32: 4}.get(self.group_size, 1)
        words = math.ceil(self.groups / 8)
        return math.ceil(words / multiplier) * multiplier


@dataclasses.dataclass
class Decoded:
    """A module's weight as integers: ``codes`` [out, in] uint8, ``scale``/``zero`` [out, groups], ``g_idx`` [in]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor


def expected_tensors(layout: Layout) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Stored tensor name -> (shape, accepted safetensors dtypes), for checking a checkpoint header."""
    i, o, b, groups, word = layout.in_features, layout.out_features, layout.bits, layout.groups, ("I32",)
    floats = ("F16", "BF16", "F32")
    if layout.kind.startswith("gptq"):
        return {
            "qweight": ((i * b // 32, o), word),
            "qzeros": ((groups, o * b // 32), word),
            "scales": ((groups, o), floats),
            "g_idx": ((i,), ("I32", "I64")),
        }
    if layout.kind == "awq-gemm":
        tensors = {"qweight": ((i, o // 8), word), "qzeros": ((groups, o // 8), word), "scales": ((groups, o), floats)}
    else:
        width = layout.awq_gemv_width
        tensors = {"qweight": ((o, i // 8), word), "qzeros": ((o, width), word), "scales": ((o, 8 * width), floats)}
    if not layout.has_zeros:
        del tensors["qzeros"]
    return tensors


def decode(layout: Layout, stored: dict[str, torch.Tensor]) -> Decoded:
    """Codes, scales and zero points from a module's stored tensors (already checked against the layout)."""
    b, groups = layout.bits, layout.groups
    if layout.kind.startswith("gptq"):
        codes = unpack(stored["qweight"], b, dim=0).t()
        words = stored["qzeros"]
        if layout.kind == "gptq":
            words = _shift_zeros(words, b, +1)
        zero = unpack(words, b, dim=1).t()
        scale = stored["scales"].t()
        g_idx = stored["g_idx"].to(torch.int32) if "g_idx" in stored else _plain_g_idx(layout)
    elif layout.kind == "awq-gemm":
        order = _awq_reverse_order(layout.out_features)
        codes = unpack(stored["qweight"], 4, dim=1)[:, order].t()
        zero = unpack(stored["qzeros"], 4, dim=1)[:, order].t() if layout.has_zeros else None
        scale = stored["scales"].t()
        g_idx = _plain_g_idx(layout)
    else:
        codes = unpack(stored["qweight"], 4, dim=1)
        zero = unpack(stored["qzeros"], 4, dim=1)[:, :groups] if layout.has_zeros else None
        scale = stored["scales"][:, :groups]
        g_idx = _plain_g_idx(layout)
    if zero is None:
        zero = torch.full(scale.shape, 1 << (b - 1), dtype=torch.uint8)
    return Decoded(codes.contiguous(), scale.contiguous(), zero.contiguous(), g_idx)


def encode(layout: Layout, decoded: Decoded) -> dict[str, torch.Tensor]:
    """The stored tensors of a module, as its format writes them; ``decode(layout, encode(layout, d))`` is ``d``."""
    b, codes, zero, scale = layout.bits, decoded.codes, decoded.zero, decoded.scale
    if layout.kind.startswith("gptq"):
        words = pack(zero.t(), b, dim=1)
        if layout.kind == "gptq":
            words = _shift_zeros(words, b, -1)
        return {
            "qweight": pack(codes.t(), b, dim=0),
            "qzeros": words,
            "scales": scale.t().contiguous(),
            "g_idx": decoded.g_idx.to(torch.int32),
        }
    if layout.kind == "awq-gemm":
        order = _awq_order(layout.out_features)
        stored = {
            "qweight": pack(codes.t()[:, order], 4, dim=1),
            "qzeros": pack(zero.t()[:, order], 4, dim=1),
            "scales": scale.t().contiguous(),
        }
    else:
        width = layout.awq_gemv_width
        padded_zero = torch.zeros(layout.out_features, 8 * width, dtype=torch.uint8)
        padded_zero[:, : layout.groups] = zero
        padded_scale = torch.zeros(layout.out_features, 8 * width, dtype=scale.dtype)
        padded_scale[:, : layout.groups] = scale
        stored = {"qweight": pack(codes, 4, dim=1), "qzeros": pack(padded_zero, 4, dim=1), "scales": padded_scale}
    if not layout.has_zeros:
        del stored["qzeros"]
    return stored


# -- int32 words <-> codes ------------------------------------------------------------------------------------


def unpack(words: torch.Tensor, bits: int, *, dim: int) -> torch.Tensor:
    """uint8 codes from int32 words packed along ``dim`` (``32 / bits`` codes per word, least significant first)."""
    values = words.movedim(dim, -1).to(torch.int64) & _MASK32
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int64)
        codes = ((values.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    else:  # 3-bit: one bit stream, 3 words per 32 codes
        stream = ((values.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).flatten(-2)
        fields = stream.unflatten(-1, (-1, bits))
        codes = (fields << torch.arange(bits, dtype=torch.int64)).sum(-1)
    return codes.to(torch.uint8).movedim(-1, dim)


def pack(codes: torch.Tensor, bits: int, *, dim: int) -> torch.Tensor:
    """int32 words from codes along ``dim``: the inverse of :func:`unpack`."""
    values = codes.movedim(dim, -1).to(torch.int64) & ((1 << bits) - 1)
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int64)
        words = (values.unflatten(-1, (-1, 32 // bits)) << shifts).sum(-1)
    else:
        stream = ((values.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int64)) & 1).flatten(-2)
        words = (stream.unflatten(-1, (-1, 32)) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return _as_int32(words).movedim(-1, dim).contiguous()


def _as_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits."""
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def _shift_zeros(words: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    """GPTQ v1 <-> v2 zero points, exactly as gptqmodel converts them (so v1 files it wrote decode as it reads them).

    2/4/8-bit: one integer addition of ``0x11111111``-style constants on the packed word, carries included; 3-bit:
    each field plus or minus one, modulo 8.
    """
    if 32 % bits:
        return pack((unpack(words, bits, dim=1).to(torch.int64) + delta) % (1 << bits), bits, dim=1)
    constant = sum(1 << (bits * k) for k in range(32 // bits))
    return _as_int32(((words.to(torch.int64) & _MASK32) + delta * constant) & _MASK32)


def _awq_order(features: int) -> torch.Tensor:
    """Column gather that puts plain-ordered features into AWQ's packing order."""
    return (torch.arange(features).view(-1, 8)[:, list(AWQ_ORDER)]).flatten()


def _awq_reverse_order(features: int) -> torch.Tensor:
    return torch.argsort(_awq_order(features))


def _plain_g_idx(layout: Layout) -> torch.Tensor:
    return (torch.arange(layout.in_features, dtype=torch.int32) // layout.group_size).to(torch.int32)
