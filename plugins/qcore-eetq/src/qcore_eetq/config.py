"""``EetqConfig``: the ``quantization_config`` of ``quant_method: eetq``, read by every one of the six phases.

The fields, defaults and dict form are those of transformers' ``EetqConfig``, so a config.json written by either
reads in the other. This module imports neither torch nor eetq.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qcore import ConfigError, QuantConfig

__all__ = ["EetqConfig"]


@dataclasses.dataclass
class EetqConfig(QuantConfig):
    """Per-output-channel symmetric int8 weights (one float16 scale per output row), activations in the model dtype.

    :param weights: the weight dtype; ``"int8"`` is the only one EETQ has.
    :param modules_to_not_convert: modules kept in full precision. ``None`` keeps transformers' defaults (the output
        embeddings / ``lm_head``, tied weights); a list replaces them.
    """

    quant_method: ClassVar[str] = "eetq"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    weights: str = "int8"
    modules_to_not_convert: list[str] | None = None

    def check(self) -> None:
        if self.weights != "int8":
            raise ConfigError(
                f"eetq config: field 'weights' must be 'int8' (EETQ's only weight type), got {self.weights!r}"
            )

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        # One int8 per weight, one float16 scale per output row, and the one-byte `weight_layout` tag.
        return out_features * in_features + 2 * out_features + 1

    def short_name(self) -> str:
        return "eetq int8"
