"""The ``bitsandbytes`` quantization config: transformers' ``BitsAndBytesConfig`` as a qcore dataclass.

Parsed from the ``quantization_config`` dict before phase 1 and read by every phase; ``to_dict`` writes the dict
transformers writes into config.json, so a checkpoint saved by either library loads in the other. Imports neither
torch nor bitsandbytes (``qcore backends`` lists this backend without them).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import qcore
from qcore.config import dtype_name

__all__ = ["BnbConfig", "BLOCKSIZES", "DEFAULT_BLOCKSIZE"]

#: Block sizes bitsandbytes' ``quantize_4bit`` accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: ``Params4bit``'s block size, the only one transformers ever uses (its config has no field for it).
DEFAULT_BLOCKSIZE = 64
#: Storage dtypes transformers accepts for ``bnb_4bit_quant_storage``, with their sizes in bytes.
QUANT_STORAGE_NBYTES = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
QUANT_TYPES = ("fp4", "nf4")
#: Double quantization stores the float32 block scales as uint8, in blocks of 256 with a float32 scale each.
NESTED_BLOCKSIZE = 256
#: A float32 ``nested_offset`` as it appears in the packed quant state; only its length matters for the estimate.
_TYPICAL_OFFSET = 0.012345678901234567


@dataclasses.dataclass
class BnbConfig(qcore.QuantConfig):
    """bitsandbytes 4-bit (nf4/fp4, QLoRA) or 8-bit (LLM.int8()) weights.

    Field names and defaults are those of ``transformers.BitsAndBytesConfig``. Exactly one of ``load_in_4bit`` and
    ``load_in_8bit`` must be true.
    """

    quant_method: ClassVar[str] = "bitsandbytes"
    # The compute dtype only decides how matmuls run; every other field describes the stored tensors.
    loading_attributes: ClassVar[frozenset[str]] = frozenset({"bnb_4bit_compute_dtype"})
    # transformers writes the two flags twice, as ``load_in_4bit`` and as its private ``_load_in_4bit``.
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"_load_in_4bit", "_load_in_8bit"})
    skip_field: ClassVar[str | None] = "llm_int8_skip_modules"

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    #: ``None`` computes in float32 (transformers' default) when quantizing, and keeps the checkpoint's compute
    #: dtype when loading a pre-quantized checkpoint.
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: str = "uint8"
    #: qcore's own field (transformers always quantizes with bitsandbytes' default, 64). Written to config.json only
    #: when it differs from 64; the block size is also stored in every weight's quant state, so transformers loads
    #: such a checkpoint correctly while ignoring the key.
    bnb_4bit_blocksize: int = DEFAULT_BLOCKSIZE

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | qcore.QuantConfig) -> qcore.QuantConfig:
        """Parse the dict transformers writes (or a user's), accepting dtypes as ``torch.bfloat16`` too."""
        if isinstance(data, qcore.QuantConfig) or not isinstance(data, Mapping):
            return super().from_dict(data)
        data = dict(data)
        for flag in ("load_in_4bit", "load_in_8bit"):
            private = f"_{flag}"
            if private in data and flag in data and data[private] != data[flag]:
                raise qcore.ConfigError(
                    f"bitsandbytes config: {flag}={data[flag]!r} contradicts {private}={data[private]!r}; "
                    f"transformers reads {flag}, so fix or drop {private}"
                )
        for field in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if data.get(field) is not None:
                data[field] = dtype_name(
                    data[field], field=field, method=cls.quant_method, allowed=_allowed_dtypes(field)
                )
        return super().from_dict(data)

    def check(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise qcore.ConfigError(
                "bitsandbytes config: load_in_4bit and load_in_8bit are both true; set only one of them"
            )
        if not (self.load_in_4bit or self.load_in_8bit):
            raise qcore.ConfigError(
                "bitsandbytes config: neither load_in_4bit nor load_in_8bit is true; set one of them "
                "(e.g. the preset bnb-nf4 or bnb-int8)"
            )
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise qcore.ConfigError(
                f"bitsandbytes config: field 'bnb_4bit_quant_type' must be one of {list(QUANT_TYPES)}, "
                f"got {self.bnb_4bit_quant_type!r}"
            )
        for field in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            dtype_name(getattr(self, field), field=field, method=self.quant_method, allowed=_allowed_dtypes(field))
        if self.bnb_4bit_blocksize not in BLOCKSIZES:
            raise qcore.ConfigError(
                f"bitsandbytes config: field 'bnb_4bit_blocksize' must be one of {list(BLOCKSIZES)}, "
                f"got {self.bnb_4bit_blocksize!r}"
            )
        if not self.llm_int8_threshold >= 0:
            raise qcore.ConfigError(
                f"bitsandbytes config: field 'llm_int8_threshold' must be >= 0 (0 disables the outlier "
                f"decomposition), got {self.llm_int8_threshold!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The dict transformers' ``BitsAndBytesConfig.to_dict()`` writes, key for key."""
        data = {
            "quant_method": self.quant_method,
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": float(self.llm_int8_threshold),
            "llm_int8_skip_modules": None if self.llm_int8_skip_modules is None else list(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": self.bnb_4bit_quant_storage,
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }
        if self.bnb_4bit_blocksize != DEFAULT_BLOCKSIZE:
            data["bnb_4bit_blocksize"] = self.bnb_4bit_blocksize
        return data

    def __eq__(self, other: object) -> bool:
        # Equal when they write the same quantization_config: an unset compute dtype (None) and "float32" quantize
        # the same way, and a round trip through config.json turns the first into the second.
        return isinstance(other, BnbConfig) and self.to_dict() == other.to_dict()

    @property
    def compute_dtype(self) -> str:
        """The dtype 4-bit matmuls run in, by name."""
        return self.bnb_4bit_compute_dtype or "float32"

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        """Bytes of the tensors bitsandbytes stores for one Linear weight (its state_dict entries)."""
        count = out_features * in_features
        if self.load_in_8bit:
            if self.llm_int8_has_fp16_weight:
                return count * dtype_nbytes
            # int8 weight, one float32 scale (SCB) per output row, and the one-byte weight_format marker.
            return count + 4 * out_features + 1
        storage = QUANT_STORAGE_NBYTES[self.bnb_4bit_quant_storage]
        packed = (count + 1) // (2 * storage) * storage
        blocks = math.ceil(count / self.bnb_4bit_blocksize)
        if self.bnb_4bit_use_double_quant:
            scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256
        else:
            scales = 4 * blocks
        quant_map = 4 * 16
        return packed + scales + quant_map + self._packed_state_nbytes(out_features, in_features, dtype_nbytes)

    def _packed_state_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        """Length of the JSON bitsandbytes packs into ``weight.quant_state.bitsandbytes__<type>``."""
        state: dict[str, Any] = {
            "quant_type": self.bnb_4bit_quant_type,
            "blocksize": self.bnb_4bit_blocksize,
            "dtype": {4: "float32", 2: "bfloat16"}.get(dtype_nbytes, "float16"),
            "shape": [out_features, in_features],
        }
        if self.bnb_4bit_use_double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=_TYPICAL_OFFSET)
        return len(json.dumps(state))

    def short_name(self) -> str:
        if self.load_in_8bit:
            return "bitsandbytes int8"
        return f"bitsandbytes {self.bnb_4bit_quant_type}" + (" double-quant" if self.bnb_4bit_use_double_quant else "")


def _allowed_dtypes(field: str) -> tuple[str, ...]:
    if field == "bnb_4bit_quant_storage":
        return tuple(QUANT_STORAGE_NBYTES)
    return ("float16", "bfloat16", "float32")
