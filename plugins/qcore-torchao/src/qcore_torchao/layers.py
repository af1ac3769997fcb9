"""The torchao layer and its stored form: quantizing a streamed weight (phase 4, on the fly), checking and rebuilding
a stored one (phase 4, pre-quantized), writing transformers' torchao safetensors format (saving) and the float weight
back (``dequantize_module``). Imported only from inside the hooks: it imports torch and torchao.

transformers' format, per quantized ``<module>.weight``: the tensor subclass's data tensors stored as
``<module>._weight_<name>`` (``qdata``, ``scale``, ``zero_point``), and, in the safetensors header, the entry
``<module>.weight`` = torchao's JSON of the subclass (``{"_type": "Int8Tensor", "_data": {...},
"_tensor_data_names": [...]}``), every plain tensor as ``{"_type": "Tensor"}``, and ``tensor_names``, the list of
every name. Both are written as torchao's ``flatten_tensor_state_dict`` writes them (with its JSON encoder); reading
never uses torchao's
``unflatten_tensor_state_dict``/``object_from_dict`` (they resolve names from the file with ``getattr``): every field
is checked against :data:`qcore_torchao.config.SCHEMA` and every tensor against the module's shape first.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Mapping
from typing import Any

import torch
import torchao
from qcore import CheckpointError
from torch import nn
from torchao import quantization as ao
from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder
from torchao.quantization.quantize_ import common, workflows
from torchao.utils import TorchAOBaseTensor

from qcore_torchao.config import DTYPES, ENUMS, SCHEMA, object_problem

__all__ = ["TorchAoLinear", "decode", "quantize", "restore", "dequantize", "stored_metadata", "weight_kind"]

# Resolved once, from qcore's own table of names (never from a file): where torchao 0.18 defines each.
_CLASSES: dict[str, Any] = {
    name: getattr(ao, name, None) or getattr(workflows, name) for name in SCHEMA if name != "Float8MMConfig"
}
_CLASSES["Float8MMConfig"] = torchao.float8.inference.Float8MMConfig
_ENUM_CLASSES: dict[str, type[enum.Enum]] = {
    name: getattr(ao, name, None) or getattr(workflows, name, None) or getattr(common, name) for name in ENUMS
}
_DTYPES = {name: getattr(torch, name) for names in DTYPES.values() for name in names}  # fixed names, not the file's
_ENUM_MEMBERS = {(kind, member): _ENUM_CLASSES[kind][member] for kind, members in ENUMS.items() for member in members}
#: Tensor subclass -> (data tensors it needs, data tensors it may have).
_DATA_NAMES = {
    "Int8Tensor": ({"qdata", "scale"}, {"zero_point"}),
    "Float8Tensor": ({"qdata", "scale"}, set()),
    "IntxUnpackedToInt8Tensor": ({"qdata", "scale", "zero_point"}, set()),
}
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def decode(value: Any) -> Any:
    """A value already checked against :data:`SCHEMA` as torchao objects, from this module's fixed tables only."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, Mapping):
        return value
    kind, data = value["_type"], value["_data"]
    if kind == "torch.dtype":
        return _DTYPES[data]
    if kind in _ENUM_CLASSES:
        return _ENUM_MEMBERS[(kind, data)]
    return _CLASSES[kind](**{field: decode(item) for field, item in data.items()})


class TorchAoLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao tensor subclass: ``forward`` is ``nn.Linear``'s, dispatched by
    torchao, exactly as in a transformers model quantized with ``TorchAoConfig``; ``state_dict`` writes the
    subclass flattened, as transformers saves it. ``config`` is the torchao config that quantizes it on the fly."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, config: Any):
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        self.config = config

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not isinstance(self.weight, TorchAOBaseTensor):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight.detach()
        # torchao's flatten_tensor_state_dict, without its copies: ``_weight_<name>`` for each data tensor present.
        for name in (*weight.tensor_data_names, *getattr(weight, "optional_tensor_data_names", ())):
            if getattr(weight, name) is not None:
                destination[f"{prefix}_weight_{name}"] = getattr(weight, name)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def quantize(weight: torch.Tensor, config: Any) -> torch.Tensor:
    """torchao's quantization of one full-precision weight ``[out, in]``, as ``quantize_`` does it in transformers.

    Returns the tensor subclass, or ``weight`` itself where torchao leaves it (a shape its groups do not divide).
    """
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight, requires_grad=False)
    ao.quantize_(holder, config)
    return holder.weight.data if isinstance(holder.weight, TorchAOBaseTensor) else holder.weight.detach()


def weight_kind(weight: torch.Tensor) -> str:
    return type(weight).__name__ if isinstance(weight, TorchAOBaseTensor) else "Tensor"


def stored_metadata(model: nn.Module, modules: tuple[str, ...]) -> dict[str, str]:
    """The header entries of transformers' torchao format: one JSON per state_dict tensor and ``tensor_names``."""
    owned = {f"{name}.weight": model.get_submodule(name).weight for name in modules}
    quantized = {key: weight for key, weight in owned.items() if isinstance(weight, TorchAOBaseTensor)}
    names = []
    for key in model.state_dict():
        module, _, tensor = key.rpartition(".")
        if tensor.startswith("_weight_") and f"{module}.weight" in quantized:
            key = f"{module}.weight"
        if key not in names:
            names.append(key)
    plain = json.dumps({"_type": torch.Tensor.__name__})
    entries = {
        key: json.dumps(quantized[key], cls=TensorSubclassAttributeJSONEncoder) if key in quantized else plain
        for key in names
    }
    return {**entries, "tensor_names": json.dumps(names)}


@functools.lru_cache(maxsize=4)
def _tensor_names(text: str) -> frozenset[str] | None:
    try:
        names = json.loads(text)
    except ValueError:
        return None
    return frozenset(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def restore(
    module_name: str,
    stored: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    file: str,
) -> torch.Tensor:
    """The torchao tensor subclass for a module's stored ``_weight_*`` tensors, after checking all of them and its
    header entry; its logical dtype becomes ``dtype`` (the load's).

    :raises qcore.CheckpointError: a missing or malformed header entry, an unknown type or field, a missing, extra or
        misshapen tensor, a wrong dtype, non-finite scales or codes outside the target range, naming file and tensor.
    """
    key = f"{module_name}.weight"

    def refuse(name: str, message: str) -> CheckpointError:
        return CheckpointError(message, file=file, tensor=name)

    names = _tensor_names(metadata.get("tensor_names", ""))
    if names is None or key not in names:
        raise refuse(key, "is not listed in the header's 'tensor_names' (a JSON list of every tensor name); the "
                     "file is not in torchao's safetensors format, or its header is damaged")  # fmt: skip
    try:
        entry = json.loads(metadata.get(key, ""))
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        raise refuse(key, "has no JSON object in the header (torchao's description of the quantized tensor)")
    found = object_problem(entry, f"header[{key!r}]", exact=True)
    if found is None and entry["_type"] not in _DATA_NAMES:
        found = f"header[{key!r}]._type is {entry['_type']!r}, not a tensor type qcore reads ({sorted(_DATA_NAMES)})"
    if found is not None:
        raise refuse(key, found)
    kind = entry["_type"]
    required, optional = _DATA_NAMES[kind]
    listed = entry.get("_tensor_data_names")
    if not isinstance(listed, list) or not required <= set(listed) <= required | optional:
        raise refuse(key, f"lists tensors {listed!r}; a {kind} stores {sorted(required)} (and {sorted(optional)})")
    present = {name.removeprefix("_weight_") for name in stored}
    for name in sorted(present - set(listed)):
        raise refuse(f"{module_name}._weight_{name}", f"is not among the tensors the header lists ({listed})")
    for name in sorted(set(listed) - present):
        raise refuse(f"{module_name}._weight_{name}", f"is missing; the header's {kind} needs it")
    tensors = {name.removeprefix("_weight_"): tensor for name, tensor in stored.items()}
    attributes = dict(entry["_data"])
    _check_tensors(
        kind, tensors, attributes, out_features, in_features, lambda n, m: refuse(f"{module_name}._weight_{n}", m)
    )
    attributes = {field: decode(value) for field, value in attributes.items()}
    attributes["dtype"] = dtype
    try:
        return _CLASSES[kind](**tensors, **attributes)
    except (AssertionError, ValueError, TypeError, RuntimeError) as error:
        raise refuse(key, f"torchao rejects the stored {kind}: {error}") from None


def _check_tensors(kind, tensors, attributes, out_features, in_features, refuse) -> None:
    qdata = tensors["qdata"]
    codes = (torch.float8_e4m3fn, torch.float8_e5m2) if kind == "Float8Tensor" else (torch.int8,)
    if qdata.dtype not in codes or tuple(qdata.shape) != (out_features, in_features):
        raise refuse("qdata", f"is {_describe(qdata)}, expected {codes[0]} [{out_features}, {in_features}]")
    block = attributes["block_size"]
    rows_per_block = out_features if kind == "Float8Tensor" else 1
    if (
        len(block) != 2
        or block[0] not in (1, rows_per_block)
        or block[1] <= 0
        or in_features % block[1]
        or out_features % block[0]
    ):
        raise refuse("qdata", f"the header's block_size {block} does not tile a {out_features}x{in_features} weight")
    statistics = (out_features // block[0], in_features // block[1])
    for name in ("scale", "zero_point"):
        if name not in tensors:
            continue
        tensor = tensors[name]
        allowed = (torch.int8, *_SCALE_DTYPES) if name == "zero_point" else _SCALE_DTYPES
        if kind == "Int8Tensor" and name == "zero_point":
            allowed = (torch.int8,)
        if tensor.dtype not in allowed or tuple(tensor.shape) != statistics:
            names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            raise refuse(name, f"is {_describe(tensor)}, expected {names} {list(statistics)} for block_size {block}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise refuse(name, "holds NaN or infinite values; the checkpoint is corrupt")
    if kind == "IntxUnpackedToInt8Tensor":
        bits = int(attributes["target_dtype"]["_data"].removeprefix("int"))
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if qdata.numel() and not low <= int(qdata.min()) <= int(qdata.max()) <= high:
            raise refuse("qdata", f"holds codes outside {low}..{high}, the range of int{bits}")


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight a torchao tensor (or a plain one) computes with, in ``dtype``."""
    if isinstance(weight, TorchAOBaseTensor):
        return weight.dequantize().to(dtype)
    return weight.detach().to(dtype).clone()
