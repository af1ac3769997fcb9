"""optimum-quanto's own checkpoints: a ``model.safetensors`` of ``quanto.freeze``d modules' ``state_dict`` (8-bit:
``weight._data`` and ``weight._scale``; int2/int4: the packed ``weight._data._data``, ``weight._scale`` and
``weight._shift``, which quanto also writes for weights it holds in its tinygemm layout; and ``input_scale`` and
``output_scale``) beside the JSON ``quantization_map`` quanto keeps apart from config.json.

:func:`quanto_checkpoint` opens such a directory as a :class:`~qcore.checkpoint.CheckpointSource` whose config
carries the map as a qcore-quanto ``quantization_config``, so the load runs pre-quantized through this backend
(phase 1 onwards); :func:`from_quanto_layout` turns one module's tensors into qcore-quanto's stored form in
``load_weight``. The map is checked against a fixed table (never ``quanto.requantize``, which instantiates the
names it holds); only quanto's pure-torch operations run, never its extension.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from qcore import CheckpointError
from qcore.checkpoint import CheckpointReader, weight_file

from qcore_quanto.config import BITS
from qcore_quanto.layers import pack

__all__ = ["quanto_checkpoint", "from_quanto_layout", "QUANTO_TENSORS"]

#: quanto's qtype names (``quantization_map`` writes ``qtype.name``; ``qfloat8`` is ``qfloat8_e4m3fn``) -> qcore's.
_KINDS = {"qint2": "int2", "qint4": "int4", "qint8": "int8", "qfloat8_e4m3fn": "float8"}
#: Tensor names (relative to the module) that mark quanto's own layout.
QUANTO_TENSORS = ("weight._data", "weight._data._data")


class QuantoCheckpoint(CheckpointReader):
    """A quanto ``safetensors + qmap`` directory, read as a pre-quantized qcore-quanto checkpoint."""

    def __init__(self, directory: str | Path, qmap: str = "quanto_qmap.json"):
        super().__init__(directory)
        path = weight_file(self.directory, qmap, self.directory)
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot be read as quanto's quantization map ({error})", file=str(path)) from None
        if not isinstance(table, dict):
            raise CheckpointError("must hold a JSON object: module name -> {weights, activations}", file=str(path))
        self.weights = {}
        for name, entry in table.items():
            if not isinstance(entry, dict) or set(entry) != {"weights", "activations"}:
                raise CheckpointError("is not {'weights': ..., 'activations': ...}", file=str(path), tensor=name)
            if entry["activations"] != "none":
                raise CheckpointError(
                    f"quantizes activations ({entry['activations']!r}); qcore-quanto reads weight-only quanto "
                    f"checkpoints, as transformers quantizes them",
                    file=str(path), tensor=name,
                )  # fmt: skip
            if entry["weights"] != "none" and entry["weights"] not in _KINDS:
                raise CheckpointError(
                    f"has weights {entry['weights']!r}, not one of {sorted(_KINDS)} or 'none'",
                    file=str(path),
                    tensor=name,
                )
            if entry["weights"] != "none":
                self.weights[name] = _KINDS[entry["weights"]]
        if not self.weights:
            raise CheckpointError("quantizes no module's weights", file=str(path))

    def model_config(self):
        from qcore.loading import _read_model_config  # the core's own checks of config.json

        config = _read_model_config(self.directory, {})
        if getattr(config, "quantization_config", None) is not None:
            raise CheckpointError(
                "already carries a quantization_config; load the directory itself", file=str(self.directory)
            )
        config.quantization_config = {"quant_method": "quanto", "weights": dict(self.weights)}
        return config


def quanto_checkpoint(directory: str | Path, qmap: str = "quanto_qmap.json") -> QuantoCheckpoint:
    """Open optimum-quanto's own checkpoint for ``qcore.from_pretrained``: ``directory`` holds config.json,
    ``model.safetensors`` (or an index) written from the frozen model's ``state_dict`` and the map ``qmap``
    (``json.dump(optimum.quanto.quantization_map(model), ...)``).

    :raises qcore.CheckpointError: a missing or malformed map, activation quantization, an unknown weight type.
    """
    return QuantoCheckpoint(directory, qmap)


def from_quanto_layout(
    stored: dict[str, torch.Tensor], kind: str, group: int | None, out_features: int, in_features: int, refuse
) -> dict[str, torch.Tensor]:
    """One module's tensors in quanto's layout -> qcore-quanto's (``weight_codes``/``weight_packed``,
    ``weight_scale``, ``weight_shift``), every tensor's shape and dtype checked first."""
    for name in ("input_scale", "output_scale"):
        value = stored.pop(name, None)
        if value is not None and (value.numel() != 1 or not value.is_floating_point()):
            raise refuse(name, f"is {value.dtype} {list(value.shape)}, expected quanto's float scalar")
    if BITS[kind] == 8:
        expect = {"weight._data", "weight._scale"}
        _exactly(stored, expect, refuse)
        return {"weight_codes": stored["weight._data"], "weight_scale": stored["weight._scale"]}
    groups = in_features // (group or in_features)
    _exactly(stored, {"weight._data._data", "weight._scale", "weight._shift"}, refuse)
    rows, per_byte = out_features * groups, 8 // BITS[kind]
    data = stored["weight._data._data"]
    width = group or in_features
    if data.dtype != torch.uint8 or tuple(data.shape) != (-(-rows // per_byte), width):
        raise refuse("weight._data._data", f"is {data.dtype} {list(data.shape)}, expected quanto's packed uint8 "
                     f"[{-(-rows // per_byte)}, {width}]")  # fmt: skip
    mask = (1 << BITS[kind]) - 1
    # quanto packs along the first dimension of the grouped [out * groups, g] codes: byte row r holds rows r,
    # r + R, r + 2R ... (R the packed row count) in successive bit fields.
    codes = torch.cat([(data >> (BITS[kind] * i)) & mask for i in range(per_byte)])[:rows]
    reshape = {}
    for name in ("weight._scale", "weight._shift"):
        if stored[name].numel() != rows:
            raise refuse(name, f"holds {stored[name].numel()} values, expected one per group ({rows})")
        reshape[name] = stored[name].reshape(out_features, groups)
    return {
        "weight_packed": pack(codes.reshape(out_features, in_features), BITS[kind]),
        "weight_scale": reshape["weight._scale"],
        "weight_shift": reshape["weight._shift"],
    }


def _exactly(stored, expected, refuse) -> None:
    for name in sorted(set(stored) ^ expected):
        raise refuse(name, f"{'is not' if name in stored else 'is missing from'} quanto's layout ({sorted(expected)})")
