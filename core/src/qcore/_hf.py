"""The ``hf_quantizer`` a qcore model carries, so transformers, PEFT and Trainer treat it as quantized.

transformers decides ``model.is_quantized`` from ``model.hf_quantizer``, and PEFT and Trainer ask it whether the
model is trainable and read ``quantization_config`` from it. This object answers those questions for a model qcore
loaded; it takes no part in loading (qcore's six phases did that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.quantizers.base import HfQuantizer


class _RecipeConfig:
    """Stands in for a transformers config object when the method (a recipe) has none."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = dict(data)
        self.quant_method = self._data["quant_method"]

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def to_json_string(self, use_diff: bool = True) -> str:
        import json

        return json.dumps(self._data, indent=2, sort_keys=True) + "\n"


def _transformers_config(data: Mapping[str, Any]):
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:
        return AutoQuantizationConfig.from_dict(dict(data))
    except (ValueError, TypeError, ImportError, KeyError):
        return _RecipeConfig(data)


class QcoreQuantizer(HfQuantizer):
    """transformers' view of a model qcore quantized."""

    requires_calibration = False

    def __init__(self, quantization_dict: Mapping[str, Any], single_config: Any):
        super().__init__(_transformers_config(quantization_dict), pre_quantized=True)
        self.qcore_config = single_config

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model
