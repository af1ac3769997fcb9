"""``GgufConfig``: the ``quantization_config`` of ``quant_method: gguf``, read by every one of the six phases.

A GGUF file states each tensor's block type itself, so loading one needs no settings: its reader writes this config
onto the model config it makes. ``weight_type`` matters only when quantizing a full-precision checkpoint on the fly
into one of the block types the gguf package can write. This module imports neither torch nor gguf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from qcore import ConfigError, QuantConfig

__all__ = ["GgufConfig", "GGML_TYPES", "SUPPORTED_TYPES", "WRITABLE_TYPES", "KERNEL_TYPES"]

#: Every ggml type id llama.cpp defines -> (name, elements per block, bytes per block): the format's own table
#: (``GGML_QUANT_SIZES`` in gguf/constants.py), here so that headers are checked without importing gguf.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
_SIZES = {name: (block, size) for name, block, size in GGML_TYPES.values()}
#: The types qcore-gguf keeps in memory as stored; a file holding another is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: The ones the gguf package's own quantizers write (``gguf.quants.quantize``), for quantizing on the fly.
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
#: The ones whose groups are plain integers, held as ``qcore.kernels`` weights: 4-bit types as int4 weights on the
#: int4 kernel, 5-, 6- and 8-bit ones as int8 weights (on two int4 halves; Q6_K's groups of 16, which no kernel of
#: torch's takes, dequantize from their int8 codes, 2.6x faster than from the blocks). The rest (Q2_K, Q3_K, Q5_K)
#: dequantize from their blocks in each forward.
KERNEL_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0")
#: Bytes a kernel-layer weight of each type holds per 32 weights on the CPU int4 kernel (its codes, the exact
#: statistics that make saves byte-exact, the kernel's bfloat16 scales-and-zeros: one pair a group, two for int8's
#: halves; Q4_K and Q6_K also their block bytes the float scales do not keep), against the blocks' 18-34.
_KERNEL_BYTES_PER_32 = {
    "Q4_0": 16 + 2 + 4, "Q4_1": 16 + 2 + 4 + 4, "Q4_K": 16 + 4 + 4 + 4 + 2, "Q5_0": 32 + 2 + 8,
    "Q5_1": 32 + 2 + 4 + 8, "Q6_K": 32 + 8 + 2.25, "Q8_0": 32 + 2 + 8,
}  # fmt: skip
#: Of those, the kernel's scales-and-zeros (none for Q6_K: no kernel takes its groups of 16).
_KERNEL_SCALES_PER_32 = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 8, "Q5_1": 8, "Q6_K": 0, "Q8_0": 8}


@dataclasses.dataclass
class GgufConfig(QuantConfig):
    """Linear weights held as GGUF blocks, dequantized or multiplied by ``qcore.kernels`` in the forward.

    :param weight_type: the block type a full-precision checkpoint's Linears are quantized to (one of
        :data:`WRITABLE_TYPES`). A GGUF file or a saved checkpoint keeps the type each tensor is stored in; its
        config records the file's most common Linear type here, for memory estimates.
    :param modules_to_not_convert: modules kept in full precision. ``None`` keeps transformers' defaults (the output
        embeddings, tied weights); a list replaces them. A GGUF file's reader sets it to the modules without a tensor
        of their own (a tied head).
    :param gguf_file: the GGUF file the model was loaded from (transformers' field; informative).
    :param kernel_types: loading attribute, never saved: the block types put on ``qcore.kernels`` (``None``: all of
        :data:`KERNEL_TYPES`). The kernels' codes and statistics take more memory than the blocks for some types
        (Q5_0 1.9x, Q4_K 1.7x, Q6_K 1.6x; Q4_0 1.2x) and decode many times faster than dequantizing every forward;
        a type left out keeps its file's bytes and dequantizes in each forward.
    """

    quant_method: ClassVar[str] = "gguf"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"
    loading_attributes: ClassVar[frozenset[str]] = frozenset({"kernel_types"})

    weight_type: str = "Q8_0"
    modules_to_not_convert: list[str] | None = None
    gguf_file: str | None = None
    kernel_types: list[str] | None = dataclasses.field(default=None, compare=False)

    def check(self) -> None:
        if self.weight_type not in SUPPORTED_TYPES:
            raise ConfigError(
                f"gguf config: field 'weight_type' must be one of {list(SUPPORTED_TYPES)}, got {self.weight_type!r}"
            )
        kinds = self.kernel_types
        if kinds is not None and (not isinstance(kinds, list) or not all(k in KERNEL_TYPES for k in kinds)):
            raise ConfigError(
                f"gguf config: field 'kernel_types' must be a list of block types from {list(KERNEL_TYPES)} (or "
                f"null for all of them), got {kinds!r}"
            )

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("kernel_types")  # a loading attribute: how this process runs the model, not what the file holds
        return data

    def on_kernel(self, type_name: str) -> bool:
        """Whether weights stored in ``type_name`` run on ``qcore.kernels`` (else they dequantize per forward)."""
        return type_name in (KERNEL_TYPES if self.kernel_types is None else self.kernel_types)

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        if self.on_kernel(self.weight_type):
            # What the kernel-layer weight holds once selected, per 32 weights (see _KERNEL_BYTES_PER_32); the int
            # kernels' scales-and-zeros exist for 16-bit activations only (float32 dequantizes).
            per_32 = _KERNEL_BYTES_PER_32[self.weight_type]
            if dtype_nbytes != 2:
                per_32 -= _KERNEL_SCALES_PER_32[self.weight_type]
            return math.ceil(out_features * in_features / 32 * per_32) + 1
        block, size = _SIZES[self.weight_type]
        return out_features * -(-in_features // block) * size + 1  # and the one-byte weight_type

    def short_name(self) -> str:
        return f"gguf {self.weight_type}"
