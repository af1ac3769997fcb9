"""Phase 4 for a pre-quantized checkpoint: one HQQ module's stored tensors, decoded and checked before hqq sees them.

``HQQLinear.state_dict`` stores every setting as a tensor (a bool as a uint8 scalar, an int as an int32 scalar, a
string or a dtype as its ASCII codes). hqq's own loader turns a stored dtype back into a ``torch.dtype`` with
``eval`` on those codes (``hqq.core.utils.decode_safetensor_type``), so a checkpoint could run any code it spells
there, and it trusts every size, so a truncated scale or a tampered ``nbits`` loads and computes garbage. Here each
tensor is decoded by qcore instead: an allow-list of field names, each with the one encoding hqq writes for it,
strings and dtypes looked up in fixed tables of names, and every tensor checked against the module's shape and the
packing its ``nbits`` and ``group_size`` imply. Nothing read from the file is evaluated, unpickled or imported.
:func:`decode` returns plain Python values and tensors; ``layers.restore`` hands them to
``HQQLinear.load_state_dict`` without hqq's ``encoded_state_dict`` flag, so hqq decodes nothing itself.

Imported only from inside the hooks: it imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import qcore
import torch

__all__ = ["decode", "FIELDS"]

#: Flags: name -> the value a checkpoint qcore can load must hold (``None``: either).
_FLAGS: dict[str, bool | None] = {
    "encoded_state_dict": True,
    "stores_quant_config": True,
    "channel_wise": True,
    "quant_scale": False,
    "quant_zero": False,
    "offload_meta": False,
    "optimize": None,
    "round_zero": None,
    "view_as_float": None,
}
_INTEGERS = ("nbits", "group_size", "axis")
#: nbits -> (packing name, quantized values per packed element, packed element dtype): ``hqq.core.bitpack``.
_PACKINGS: dict[int, tuple[str, int, torch.dtype]] = {
    8: ("8bit_u8", 1, torch.uint8),
    4: ("4bit_u8", 2, torch.uint8),
    3: ("3bit_32", 10, torch.int32),
    2: ("2bit_u8", 4, torch.uint8),
    1: ("1bit_u8", 8, torch.uint8),
}
#: The names a stored dtype may spell, and the dtype each stands for: the only dtypes hqq writes there.
_FLOAT_DTYPES = {"torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32}
_UNPACK_DTYPES = {"torch.uint8": torch.uint8, "torch.int32": torch.int32}
_NAMES: dict[str, Mapping[str, Any]] = {
    "packing": {name: name for name, _, _ in _PACKINGS.values()},
    "unpack_view_dtype": _UNPACK_DTYPES,
    "compute_dtype": _FLOAT_DTYPES,
}
_TENSORS = ("W_q", "scale", "zero", "shape")
#: Every tensor ``HQQLinear.state_dict`` writes for a module, besides its optional ``bias``.
FIELDS = frozenset({*_FLAGS, *_INTEGERS, *_NAMES, *_TENSORS})
_LONGEST_NAME = max(len(name) for table in _NAMES.values() for name in table)


def decode(
    module_name: str,
    stored: Mapping[str, torch.Tensor],
    out_features: int,
    in_features: int,
    *,
    file: str | None,
    expected: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plain ``state_dict`` ``HQQLinear.load_state_dict`` takes, from the tensors hqq stored for one module.

    :param stored: the module's stored tensors, by name relative to the module (``W_q``, ``nbits``, ..., ``bias``).
    :param expected: the module's ``weight_quant_params`` from the checkpoint's config (``nbits``, ``axis``), to
        check the stored tensors agree with it; ``None`` when the config gives no settings for this module.
    :raises qcore.CheckpointError: a missing or unknown tensor, or one whose dtype, shape or value does not fit,
        naming the file, the tensor and what was expected.
    """

    def fail(key: str, problem: str, wanted: str) -> qcore.CheckpointError:
        return qcore.CheckpointError(
            f"{problem}; expected {wanted}. The checkpoint is corrupt or was not written by hqq's HQQLinear: "
            f"download it again",
            file=file,
            tensor=f"{module_name}.{key}",
        )

    missing = sorted(FIELDS - stored.keys())
    unknown = sorted(stored.keys() - FIELDS - {"bias"})
    if missing or unknown:
        key = (missing or unknown)[0]
        problem = f"the module lacks {missing}" if missing else f"the module has tensors hqq does not store: {unknown}"
        raise fail(key, problem, f"exactly {sorted(FIELDS)} (+ bias)")

    values: dict[str, Any] = {}
    for key, required in _FLAGS.items():
        value = _scalar(stored[key], torch.uint8, key, fail, "a uint8 scalar 0 or 1")
        if value not in (0, 1) or (required is not None and value != required):
            wanted = (
                f"{int(required)} ({'true' if required else 'false'}; qcore loads no other)"
                if required is not None
                else "0 or 1"
            )
            raise fail(key, f"holds {value}", wanted)
        values[key] = bool(value)
    for key in _INTEGERS:
        values[key] = _scalar(stored[key], torch.int32, key, fail, "an int32 scalar")
    for key, table in _NAMES.items():
        values[key] = table[_name(stored[key], table, key, fail)]

    nbits, group_size, axis = values["nbits"], values["group_size"], values["axis"]
    if nbits not in _PACKINGS:
        raise fail("nbits", f"holds {nbits}", f"one of {sorted(_PACKINGS)}")
    packing, per_element, element_dtype = _PACKINGS[nbits]
    if values["packing"] != packing:
        raise fail("packing", f"names {values['packing']!r} for {nbits}-bit weights", repr(packing))
    if values["unpack_view_dtype"] != element_dtype:
        raise fail("unpack_view_dtype", f"is {values['unpack_view_dtype']} for {packing}", str(element_dtype))
    if axis not in (0, 1):
        raise fail("axis", f"holds {axis}", "0 or 1")
    if expected is not None:
        for key in ("nbits", "axis"):
            if values[key] != expected[key]:
                raise fail(
                    key,
                    f"holds {values[key]} but config.json quantizes this module with {key}={expected[key]}",
                    f"{expected[key]}",
                )
    numel = out_features * in_features
    if group_size <= 0 or numel % group_size:
        raise fail("group_size", f"holds {group_size}", f"a positive divisor of the module's {numel} weights")

    shape = stored["shape"]
    if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
        raise fail("shape", f"is {shape.dtype} of shape {tuple(shape.shape)}", "an int64 tensor of 2 elements")
    if tuple(shape.tolist()) != (out_features, in_features):
        raise fail("shape", f"holds {shape.tolist()}", f"the module's shape [{out_features}, {in_features}]")
    values["shape"] = torch.Size((out_features, in_features))

    # hqq lays the weight out as (groups, group_size) for axis 1 and (group_size, groups) for axis 0, one scale and
    # one zero per group, and packs along dimension 0 (3-bit pads it to a multiple of 10).
    groups = numel // group_size
    rows, columns = (groups, group_size) if axis == 1 else (group_size, groups)
    if nbits != 3 and rows % per_element:
        raise fail(
            "group_size",
            f"holds {group_size}, leaving {rows} rows",
            f"a row count {packing} can pack (a multiple of {per_element})",
        )
    packed = (math.ceil(rows / per_element), columns)
    values["W_q"] = _packed_weight(stored["W_q"], packed, element_dtype, values["view_as_float"], fail)
    statistics = (rows, 1) if axis == 1 else (1, columns)
    for key in ("scale", "zero"):
        tensor = stored[key]
        if tensor.dtype not in _FLOAT_DTYPES.values() or tuple(tensor.shape) != statistics:
            raise fail(
                key,
                f"is {tensor.dtype} of shape {tuple(tensor.shape)}",
                f"a float16/bfloat16/float32 tensor of shape {statistics} (one per group)",
            )
        if not torch.isfinite(tensor).all():
            raise fail(key, "holds NaN or infinite values", "finite values")
        values[key] = tensor
    if "bias" in stored:
        bias = stored["bias"]
        if not bias.is_floating_point() or tuple(bias.shape) != (out_features,):
            raise fail(
                "bias", f"is {bias.dtype} of shape {tuple(bias.shape)}", f"a float tensor of shape ({out_features},)"
            )
        values["bias"] = bias
    # Without it hqq decodes nothing: every value above is already what its loader would have decoded.
    del values["encoded_state_dict"]
    return values


def _scalar(tensor: torch.Tensor, dtype: torch.dtype, key: str, fail: Any, wanted: str) -> int:
    if tensor.dtype != dtype or tensor.dim() != 0:
        raise fail(key, f"is {tensor.dtype} of shape {tuple(tensor.shape)}", wanted)
    return int(tensor.item())


def _name(tensor: torch.Tensor, table: Mapping[str, Any], key: str, fail: Any) -> str:
    names = sorted(table)
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not 0 < tensor.numel() <= _LONGEST_NAME:
        raise fail(key, f"is {tensor.dtype} of shape {tuple(tensor.shape)}", f"the ASCII codes of one of {names}")
    text = bytes(tensor.tolist()).decode("ascii", errors="replace")
    if text not in table:
        raise fail(key, f"spells {text!r}", f"one of {names}")
    return text


def _packed_weight(
    tensor: torch.Tensor, packed: tuple[int, int], element_dtype: torch.dtype, view_as_float: bool, fail: Any
) -> torch.Tensor:
    rows, columns = packed
    if not view_as_float:
        if tensor.dtype != element_dtype or tuple(tensor.shape) != packed:
            raise fail("W_q", f"is {tensor.dtype} of shape {tuple(tensor.shape)}", f"{element_dtype} of shape {packed}")
        return tensor
    # view_as_float stores the same bytes viewed as a float dtype, which changes the last dimension.
    element_bytes = torch.tensor([], dtype=element_dtype).element_size()
    size = tensor.element_size()
    if (
        tensor.dtype not in _FLOAT_DTYPES.values()
        or (columns * element_bytes) % size
        or tuple(tensor.shape) != (rows, columns * element_bytes // size)
    ):
        raise fail(
            "W_q",
            f"is {tensor.dtype} of shape {tuple(tensor.shape)} with view_as_float set",
            f"the {element_dtype} packing of shape {packed} viewed as float16/bfloat16/float32",
        )
    return tensor
