"""``QuantoConfig``: the ``quantization_config`` of ``quant_method: quanto``, read by every one of the six phases.

On the fly it is transformers' ``QuantoConfig`` dict (``weights`` one of ``"int2"``, ``"int4"``, ``"int8"``,
``"float8"``; ``activations`` null; ``modules_to_not_convert``), plus qcore's ``group_size`` for int2/int4 (quanto's
own rule when null). A checkpoint qcore saves carries ``weights`` as the per-module map (module name -> weight type)
instead: the checkpoint says what each module is, and transformers, whose ``QuantoConfig`` takes only a name there,
refuses the file instead of loading it with random weights (it cannot read quanto weights). Imports neither torch nor
optimum-quanto.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qcore import ConfigError, QuantConfig

__all__ = ["QuantoConfig", "WEIGHTS", "BITS", "default_group_size"]

#: transformers' weight names -> optimum-quanto's qtype names.
WEIGHTS = {"int2": "qint2", "int4": "qint4", "int8": "qint8", "float8": "qfloat8"}
BITS = {"int2": 2, "int4": 4, "int8": 8, "float8": 8}


def default_group_size(in_features: int) -> int | None:
    """quanto's own group size for int2/int4 weights (``QModuleMixin.__init__``): 128, 96, 64 or 32, the first that
    divides ``in_features``, when it exceeds 128; ``None`` (one group per row) otherwise."""
    if in_features <= 128:
        return None
    for group in (128, 96, 64, 32):
        if in_features % group == 0:
            return group
    return None


@dataclasses.dataclass
class QuantoConfig(QuantConfig):
    """transformers' ``QuantoConfig`` (see the module docstring).

    :param weights: the weight type, or (in a saved checkpoint) module name -> weight type.
    :param activations: must be null: transformers quantizes weights only, and so does qcore.
    :param modules_to_not_convert: modules kept in full precision.
    :param group_size: int2/int4 only: weights per scale along each row; must divide every quantized module's
        ``in_features``; null follows quanto (:func:`default_group_size`).
    """

    quant_method: ClassVar[str] = "quanto"
    skip_field: ClassVar[str | None] = "modules_to_not_convert"

    weights: str | dict[str, str] = "int8"
    activations: str | None = None
    modules_to_not_convert: list[str] | None = None
    group_size: int | None = None

    def check(self) -> None:
        kinds = self.weights.values() if isinstance(self.weights, dict) else [self.weights]
        for kind in kinds:
            if not isinstance(kind, str) or kind not in WEIGHTS:
                raise ConfigError(f"quanto config: field 'weights' must be one of {sorted(WEIGHTS)}, got {kind!r}")
        if isinstance(self.weights, dict) and not self.weights:
            raise ConfigError("quanto config: field 'weights' maps no module")
        if self.activations is not None:
            raise ConfigError(
                f"quanto config: field 'activations' must be null, got {self.activations!r}; activation "
                f"quantization needs quanto's calibration, which transformers does not run either"
            )
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
            raise ConfigError(
                f"quanto config: field 'group_size' must be a positive even number, got {self.group_size}"
            )

    def weights_for(self, module_name: str) -> str | None:
        """The weight type of ``module_name``; ``None`` when a saved map does not name it (full precision)."""
        return self.weights.get(module_name) if isinstance(self.weights, dict) else self.weights

    def group_for(self, kind: str, in_features: int) -> int | None:
        """Weights per scale for a module of ``kind`` with ``in_features`` inputs; ``None`` for one per row."""
        if BITS[kind] == 8:
            return None
        return self.group_size if self.group_size is not None else default_group_size(in_features)

    def shape_fallback(self, module_name: str, out_features: int, in_features: int) -> str | None:
        kind = self.weights_for(module_name)
        if kind is None or BITS[kind] == 8:
            return None
        group = self.group_for(kind, in_features)
        if group is not None and in_features % group:
            return f"group_size {group}: does not divide in_features={in_features}, kept in full precision"
        if in_features % 2:
            return f"kept in full precision: {kind} needs an even in_features, got {in_features}"
        return None

    def quantized_nbytes(self, out_features: int, in_features: int, dtype_nbytes: int) -> int:
        kinds = set(self.weights.values()) if isinstance(self.weights, dict) else {self.weights}
        kind = min(kinds, key=BITS.get)  # a map: counted at its smallest type
        group = self.group_for(kind, in_features) or in_features
        if BITS[kind] == 8:
            return out_features * in_features + out_features * dtype_nbytes
        return out_features * in_features * BITS[kind] // 8 + 2 * out_features * (in_features // group) * dtype_nbytes

    def short_name(self) -> str:
        return f"quanto {self.weights if isinstance(self.weights, str) else 'per-module'}"
