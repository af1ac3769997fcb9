"""``Fp8Config``: the ``quantization_config`` of ``quant_method: fp8``, read by every one of the six phases.

The fields, defaults and dict form are those of transformers' ``FineGrainedFP8Config`` (the format DeepSeek-V3 and
the Qwen3 FP8 releases use), so a config.json written by either reads in the other. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from qcore import ConfigError, QuantConfig

__all__ = ["Fp8Config"]


@dataclasses.dataclass
class Fp8Config(QuantConfig):
    """float8 e4m3 weights with float32 inverse scales (``weight_scale_inv``), one per block or per tensor.

    :param weight_block_size: ``[rows, columns]`` of a scale block; ``None`` for one scale per tensor.
    :param activation_scheme: ``"dynamic"`` (activations quantized per token on GPUs with FP8 matmul) or ``"static"``
        (a stored ``activation_scale`` per layer).
    :param dequantize: load a pre-quantized checkpoint as full-precision weights.
    :param modules_to_not_convert: modules kept in full precision (``None``: transformers' defaults).
    :param scale_fmt: ``"float"`` (float32 scales) or ``"ue8m0"`` (power-of-two scales stored as float8_e8m0fnu).
    """

    quant_method: ClassVar[str] = "fp8"
    loading_attributes: ClassVar[frozenset[str]] = frozenset({"dequantize"})
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    modules_to_not_convert: list[str] | None = None
    modules_to_convert: list[str] | None = None
    activation_scheme: str = "dynamic"
    weight_block_size: list[int] | None = dataclasses.field(default_factory=lambda: [128, 128])
    dequantize: bool = False
    scale_fmt: str = "float"
    expert_dtype: str = "fp8"

    @classmethod
    def from_dict(cls, data: Any) -> QuantConfig:
        if isinstance(data, dict) and isinstance(data.get("weight_block_size"), tuple):
            data = {**data, "weight_block_size": list(data["weight_block_size"])}
        if isinstance(data, dict) and "ignored_layers" in data and "modules_to_not_convert" not in data:
            # transformers accepts DeepSeek's spelling of the skip list.
            data = {
                **{k: v for k, v in data.items() if k != "ignored_layers"},
                "modules_to_not_convert": data["ignored_layers"],
            }
        return super().from_dict(data)

    def check(self) -> None:
        if self.activation_scheme.lower() not in ("dynamic", "static"):
            raise ConfigError(
                f"fp8 config: activation_scheme must be 'dynamic' or 'static', got {self.activation_scheme!r}"
            )
        self.activation_scheme = self.activation_scheme.lower()
        block = self.weight_block_size
        if block is not None and (
            len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ConfigError(f"fp8 config: weight_block_size must be two positive integers or null, got {block!r}")
        if self.scale_fmt not in ("float", "ue8m0"):
            raise ConfigError(f"fp8 config: scale_fmt must be 'float' or 'ue8m0', got {self.scale_fmt!r}")
        if self.expert_dtype != "fp8":
            raise ConfigError(
                f"fp8 config: expert_dtype {self.expert_dtype!r} is not supported by qcore-fp8 (FP4 expert weights "
                f"need transformers' CUDA kernels); use 'fp8'"
            )
        if self.modules_to_convert:
            raise ConfigError(
                "fp8 config: modules_to_convert (FP8 embeddings) is not supported by qcore-fp8; remove it, the "
                "embeddings then stay in full precision"
            )

    def to_dict(self) -> dict[str, Any]:
        # transformers' order of keys, and a list where it writes the tuple.
        return {"quant_method": "fp8", **dataclasses.asdict(self)}

    def skip_modules(self) -> list[str] | None:
        return self.modules_to_not_convert

    @property
    def block(self) -> tuple[int, int] | None:
        return tuple(self.weight_block_size) if self.weight_block_size is not None else None

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        # One byte a weight, one float32 (or one-byte ue8m0) scale per block, a partial edge block included.
        blocks = 1
        if self.weight_block_size is not None:
            rows, columns = self.weight_block_size
            blocks = math.ceil(out_features / rows) * math.ceil(in_features / columns)
        return out_features * in_features + blocks * (1 if self.scale_fmt == "ue8m0" else 4)

    def short_name(self) -> str:
        block = "per tensor" if self.weight_block_size is None else "x".join(map(str, self.weight_block_size))
        return f"fp8 e4m3 {block}"
