"""Phase 4, pre-quantized checkpoints: one bitsandbytes module's stored tensors, checked before bitsandbytes reads them.

bitsandbytes rebuilds a 4-bit weight from whatever its stored statistics say (``QuantState.from_dict``): it reads
the block size, shape and dtypes from a JSON string packed into a uint8 tensor, looks the dtype names up on the
``torch`` module (whose attribute lookup imports lazily loaded submodules), and its CPU and CUDA kernels index
``absmax`` and the packed weight by those numbers without checking them, so one truncated ``absmax`` reads out of
bounds and can kill the process. Here every tensor of the module is checked first: the JSON is parsed strictly
(no ``NaN``, no duplicate keys) against an allow-list of fields with their types and ranges, dtypes come from fixed
tables of names, and each tensor's dtype and shape must be exactly what bitsandbytes writes for this module's shape,
block size and storage type. bitsandbytes then receives plain, checked values only.

Imported only from inside the hooks: it imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import qcore
import torch

from qcore_bnb.config import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, BnbConfig

__all__ = ["check_4bit", "check_int8"]

#: ``quant_map`` and ``nested_quant_map`` hold one float32 value per 4-bit and per 8-bit code.
_QUANT_MAP_SIZE = 16
_NESTED_QUANT_MAP_SIZE = 256
#: The dtype names bitsandbytes writes into the packed quant state (``str(dtype).strip("torch.")``).
_WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STORAGE_DTYPES = {
    "uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float64": torch.float64,
}  # fmt: skip
#: The packed quant state is a few hundred bytes; anything far longer is not one.
_MAX_STATE_BYTES = 4096
_STATE_PREFIX = "weight.quant_state.bitsandbytes__"


class _Problem:
    """Builds the :class:`qcore.CheckpointError` for one module's tensors, naming the file, tensor and expectation."""

    def __init__(self, module_name: str, files: Mapping[str, str | None]):
        self.module_name = module_name
        self.files = files

    def __call__(self, key: str, problem: str, wanted: str) -> qcore.CheckpointError:
        return qcore.CheckpointError(
            f"{problem}; expected {wanted}. The checkpoint is corrupt or was not written by bitsandbytes: "
            f"download it again",
            # A tensor the module lacks has no file: name the one holding the module's weight.
            file=self.files.get(key) or self.files.get("weight"),
            tensor=f"{self.module_name}.{key}",
        )

    def tensor(
        self, stored: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...], why: str = ""
    ) -> torch.Tensor:
        """``stored[key]``, which must be ``dtype`` of ``shape`` (and finite, when floating); ``why`` says whence."""
        tensor = stored[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise self(key, f"is {tensor.dtype} of shape {tuple(tensor.shape)}", f"{dtype} of shape {shape}{why}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise self(key, "holds NaN or infinite values", "finite values")
        return tensor


def check_4bit(
    config: BnbConfig,
    module_name: str,
    stored: Mapping[str, torch.Tensor],
    out_features: int,
    in_features: int,
    files: Mapping[str, str | None],
) -> dict[str, Any]:
    """The ``quantized_stats`` for ``Params4bit.from_prequantized``, from one module's stored 4-bit tensors.

    :param stored: the module's tensors by name relative to the module (``weight``, ``weight.absmax``, ...), no bias.
    :param files: tensor name (as in ``stored``) -> the file holding it, for the error message.
    :returns: the statistics unpacked into plain values (``quant_type``, ``blocksize``, ``dtype``, ``shape``, ...)
        beside the checked tensors, which bitsandbytes reads without parsing anything itself.
    :raises qcore.CheckpointError: naming the file, the tensor and what was expected.
    """
    fail = _Problem(module_name, files)
    states = sorted(key for key in stored if key.startswith("weight.quant_state."))
    if len(states) != 1 or states[0].removeprefix(_STATE_PREFIX) not in QUANT_TYPES:
        raise fail(
            states[0] if states else "weight.quant_state",
            f"the module stores quant states {states}",
            f"exactly one, {_STATE_PREFIX}<{'|'.join(QUANT_TYPES)}>",
        )
    state_key = states[0]
    quant_type = state_key.removeprefix(_STATE_PREFIX)
    if quant_type != config.bnb_4bit_quant_type:
        raise fail(state_key, f"is a {quant_type} state", f"{config.bnb_4bit_quant_type}, as config.json says")
    nested = config.bnb_4bit_use_double_quant
    expected_keys = {"weight", "weight.absmax", "weight.quant_map", state_key}
    if nested:
        expected_keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    _check_keys(fail, stored, expected_keys, "bnb_4bit_use_double_quant" if nested else None)

    state = _state_fields(fail, stored[state_key], state_key, nested)
    if state["quant_type"] != quant_type:
        raise fail(state_key, f"names quant_type {state['quant_type']!r}", f"{quant_type!r}, as its name says")
    if state["shape"] != [out_features, in_features]:
        raise fail(state_key, f"names shape {state['shape']}", f"the module's shape [{out_features}, {in_features}]")

    count = out_features * in_features
    blocks = math.ceil(count / state["blocksize"])
    storage = _STORAGE_DTYPES[config.bnb_4bit_quant_storage]
    # quantize_4bit packs two 4-bit codes per byte into (count + 1) // (2 * storage bytes) rows of one element.
    packed_rows = (count + 1) // (2 * torch.tensor([], dtype=storage).element_size())
    per_block = f" (one per block of {state['blocksize']} of the {count} weights, as {state_key} says)"
    weight = fail.tensor(
        stored, "weight", storage, (packed_rows, 1), f" ({count} 4-bit codes as {config.bnb_4bit_quant_storage})"
    )
    stats: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": state["blocksize"],
        "dtype": state["dtype"],
        "shape": tuple(state["shape"]),
        "quant_map": fail.tensor(stored, "weight.quant_map", torch.float32, (_QUANT_MAP_SIZE,)),
    }
    if nested:
        stats["absmax"] = fail.tensor(stored, "weight.absmax", torch.uint8, (blocks,), per_block)
        nested_blocks = math.ceil(blocks / state["nested_blocksize"])
        stats["nested_absmax"] = fail.tensor(stored, "weight.nested_absmax", torch.float32, (nested_blocks,))
        stats["nested_quant_map"] = fail.tensor(
            stored, "weight.nested_quant_map", torch.float32, (_NESTED_QUANT_MAP_SIZE,)
        )
        stats.update(
            nested_blocksize=state["nested_blocksize"],
            nested_dtype=state["nested_dtype"],
            nested_offset=state["nested_offset"],
        )
    else:
        stats["absmax"] = fail.tensor(stored, "weight.absmax", torch.float32, (blocks,), per_block)
    return {"weight": weight, "stats": stats}


def check_int8(
    module_name: str,
    stored: Mapping[str, torch.Tensor],
    out_features: int,
    in_features: int,
    files: Mapping[str, str | None],
    *,
    fp16_weights: bool,
) -> dict[str, torch.Tensor]:
    """One module's stored LLM.int8() tensors (``weight``, ``SCB``), checked; ``weight_format`` must be row-major.

    With ``fp16_weights`` the module stores its weight unquantized, and only that weight.

    :raises qcore.CheckpointError: naming the file, the tensor and what was expected.
    """
    fail = _Problem(module_name, files)
    shape = (out_features, in_features)
    if fp16_weights:
        _check_keys(fail, stored, {"weight"}, None)
        weight = stored["weight"]
        if not weight.is_floating_point() or tuple(weight.shape) != shape:
            raise fail(
                "weight", f"is {weight.dtype} of shape {tuple(weight.shape)}", f"a float tensor of shape {shape}"
            )
        return {"weight": weight}
    _check_keys(fail, stored, {"weight", "SCB"}, None, optional={"weight_format"})
    if "weight_format" in stored:
        weight_format = stored["weight_format"]
        if weight_format.dtype != torch.uint8 or weight_format.dim() != 0:
            raise fail(
                "weight_format",
                f"is {weight_format.dtype} of shape {tuple(weight_format.shape)}",
                "a uint8 scalar",
            )
        if int(weight_format) != 0:
            raise fail(
                "weight_format",
                f"is {int(weight_format)}, a GPU-specific int8 layout bitsandbytes no longer reads",
                "0 (row-major): re-save the model with bitsandbytes >= 0.45",
            )
    weight = fail.tensor(stored, "weight", torch.int8, shape)
    scb = fail.tensor(stored, "SCB", torch.float32, (out_features,))
    return {"weight": weight, "SCB": scb}


def _check_keys(
    fail: _Problem,
    stored: Mapping[str, torch.Tensor],
    expected: set[str],
    because: str | None,
    *,
    optional: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    missing = sorted(expected - stored.keys())
    unknown = sorted(stored.keys() - expected - optional)
    if missing or unknown:
        reason = f" (config.json sets {because})" if because else ""
        problem = f"the module lacks {missing}" if missing else f"the module has tensors it should not: {unknown}"
        raise fail((missing or unknown)[0], problem, f"exactly {sorted(expected)}{reason}")


def _state_fields(fail: _Problem, tensor: torch.Tensor, key: str, nested: bool) -> dict[str, Any]:
    """The packed quant state's JSON fields, each of its type and in its range."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not 0 < tensor.numel() <= _MAX_STATE_BYTES:
        raise fail(
            key,
            f"is {tensor.dtype} of shape {tuple(tensor.shape)}",
            f"uint8 JSON bytes (1-D, at most {_MAX_STATE_BYTES})",
        )
    try:
        state = _strict_json(bytes(tensor.tolist()))
    except (UnicodeError, ValueError, RecursionError) as error:
        raise fail(key, f"does not hold valid JSON ({error})", "the JSON object bitsandbytes packs") from None
    if not isinstance(state, dict):
        raise fail(key, f"holds JSON {type(state).__name__}", "the JSON object bitsandbytes packs")
    fields: dict[str, Any] = {
        "quant_type": (str, QUANT_TYPES),
        "blocksize": (int, BLOCKSIZES),
        "dtype": (str, tuple(_WEIGHT_DTYPES)),
        "shape": (list, None),
    }
    if nested:
        fields |= {
            "nested_blocksize": (int, (NESTED_BLOCKSIZE,)),
            "nested_dtype": (str, ("float32",)),
            "nested_offset": (float, None),
        }
    if set(state) != set(fields):
        raise fail(key, f"holds the fields {sorted(state)}", f"exactly {sorted(fields)}")
    for name, (kind, allowed) in fields.items():
        value = state[name]
        right_type = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if kind is float
            else isinstance(value, kind) and not isinstance(value, bool)
        )
        if not right_type or (allowed is not None and value not in allowed):
            wanted = f"one of {list(allowed)}" if allowed is not None else f"a finite {kind.__name__}"
            raise fail(key, f"field {name!r} holds {value!r}", wanted)
    shape = state["shape"]
    if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise fail(key, f"field 'shape' holds {shape!r}", "two positive integers [out_features, in_features]")
    return state


class _NotStrict(ValueError):
    """JSON Python's parser accepts but a well-formed quant state never holds."""


def _strict_json(raw: bytes) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in pairs}) != len(pairs):
            raise _NotStrict("duplicate key")
        return dict(pairs)

    def constant(text: str) -> Any:
        raise _NotStrict(f"{text} is not JSON")

    return json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_constant=constant)
