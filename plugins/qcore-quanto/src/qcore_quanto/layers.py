"""The quanto layer and its stored form: quantizing a streamed weight exactly as optimum-quanto does (phase 4, on the
fly), checking and rebuilding a stored one (phase 4, pre-quantized), the tensors a save writes, and the float weight
back (``dequantize_module``). Imported only from inside the hooks: it imports torch and optimum-quanto.

The codes and scales are quanto's own: its optimizers (absmax for 8 bits, min-max for int2/int4) and its
``quantize_symmetric``/``quantize_affine`` ops, on the weight in the model dtype, as ``QLinear.freeze`` computes them.
The matmul is not quanto's: its int2/int4 forward unpacks through a C++ extension it compiles into site-packages on
first use. Each weight becomes a :mod:`qcore.kernels` weight instead (int8 -> ``Int8Weight``, float8 ->
``Fp8Weight``, int2/int4 -> ``Int4Weight``, whose ``(q - zero) * scale`` is quanto's ``q * scale - shift`` with
``zero = shift / scale``), and nothing here calls quanto's ``unpack`` or its extension.

Stored tensors of a quantized ``<module>`` (besides its ``bias``):

    int8     weight_codes int8 [out, in],           weight_scale [out, 1]
    float8   weight_codes float8_e4m3fn [out, in],  weight_scale [out, 1]
    int2/4   weight_packed uint8 [out, in * bits / 8] (codes little end first), weight_scale and weight_shift
             [out, in / g] (one group per row when g is null)

scales and shifts in the model dtype, exactly as quanto computes them.
"""

from __future__ import annotations

import torch
from optimum.quanto import qfloat8, qint2, qint4, qint8
from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
from qcore import CheckpointError
from qcore.kernels import Fp8Weight, Int4Weight, Int8Weight, PackedLinear, PackedWeight
from torch import nn

from qcore_quanto.config import BITS

__all__ = ["QuantoLinear", "quantize", "restore", "expected_tensors", "pack", "unpack"]

_QTYPES = {"int2": qint2, "int4": qint4, "int8": qint8, "float8": qfloat8}
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class QuantoLinear(PackedLinear):
    """A Linear whose weight is quanto-quantized, held as a qcore kernel weight: made empty on meta (phase 3),
    given its weight in phase 4 and its kernel in phase 6; ``state_dict`` writes the tensors above."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, kind: str, group):
        nn.Module.__init__(self)  # the weight arrives in phase 4; PackedLinear's constructor needs it now
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.group_size = kind, group
        self.weight: PackedWeight | None = None
        #: quanto's own shift (int2/int4), kept so a save writes it bit for bit (``zero * scale`` would round).
        self.shift: torch.Tensor | None = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        codes = self.weight.codes()
        if BITS[self.kind] == 8:
            destination[prefix + "weight_codes"] = codes
            destination[prefix + "weight_scale"] = self.weight.scale.reshape(self.out_features, 1)
        else:
            destination[prefix + "weight_packed"] = pack(codes, BITS[self.kind])
            destination[prefix + "weight_scale"] = self.weight.scale
            destination[prefix + "weight_shift"] = self.shift

    def extra_repr(self) -> str:
        kernel = self.weight.kernel if self.weight is not None else "not loaded"
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.kind}, kernel={kernel}"


def quantize(weight: torch.Tensor, kind: str, group: int | None) -> dict[str, torch.Tensor]:
    """quanto's quantization of a weight ``[out, in]`` (in the model dtype), as the stored tensors."""
    qtype = _QTYPES[kind]
    out_features, in_features = weight.shape
    if BITS[kind] == 8:
        scale = AbsmaxOptimizer()(weight, qtype=qtype, axis=0)
        codes = torch.ops.quanto.quantize_symmetric(weight, dtype=qtype.dtype, axis=0, scale=scale)
        return {"weight_codes": codes, "weight_scale": scale}
    scale, shift = MaxOptimizer()(weight, qtype=qtype, axis=0, group_size=group)
    codes = torch.ops.quanto.quantize_affine(
        weight, bits=qtype.bits, axis=0, group_size=group, scale=scale, shift=shift
    ).reshape(out_features, in_features)
    groups = in_features // (group or in_features)
    return {
        "weight_packed": pack(codes, BITS[kind]),
        "weight_scale": scale.reshape(out_features, groups),
        "weight_shift": shift.reshape(out_features, groups),
    }


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes ``[out, in]`` packed along each row, the first code in the lowest bits."""
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).reshape(codes.shape[0], -1, per_byte)
    packed = torch.zeros(grouped.shape[:2], dtype=torch.uint8, device=codes.device)
    for index in range(per_byte):
        packed |= grouped[..., index] << (bits * index)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``[out, in * bits / 8]`` bytes -> ``[out, in]`` codes."""
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * index)) & mask for index in range(8 // bits)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


def expected_tensors(kind: str, group: int | None, out_features: int, in_features: int) -> dict[str, tuple]:
    """Stored tensor name -> (shape, allowed dtypes) for a module of ``kind``."""
    if BITS[kind] == 8:
        codes = torch.float8_e4m3fn if kind == "float8" else torch.int8
        return {
            "weight_codes": ((out_features, in_features), (codes,)),
            "weight_scale": ((out_features, 1), _SCALE_DTYPES),
        }
    statistics = (out_features, in_features // (group or in_features))
    return {
        "weight_packed": ((out_features, in_features * BITS[kind] // 8), (torch.uint8,)),
        "weight_scale": (statistics, _SCALE_DTYPES),
        "weight_shift": (statistics, _SCALE_DTYPES),
    }


def restore(
    stored: dict[str, torch.Tensor], layer: QuantoLinear, module_name: str, file: str
) -> tuple[PackedWeight, torch.Tensor | None]:
    """The kernel weight (and quanto's shift) for a module's stored tensors, after checking every one of them.

    :raises qcore.CheckpointError: a missing or unexpected tensor, a wrong dtype or shape, scales and shifts of
        different dtypes, or non-finite values, naming the file and tensor.
    """

    def refuse(name: str, message: str) -> CheckpointError:
        return CheckpointError(message, file=file, tensor=f"{module_name}.{name}")

    kind, group = layer.kind, layer.group_size
    expected = expected_tensors(kind, group, layer.out_features, layer.in_features)
    for name in sorted(set(stored) - set(expected)):
        raise refuse(name, f"is not a tensor of quanto {kind} weights; expected {sorted(expected)}")
    for name, (shape, dtypes) in expected.items():
        if name not in stored:
            raise refuse(name, f"is missing; quanto {kind} weights store {sorted(expected)}")
        tensor = stored[name]
        if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
            allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise refuse(
                name,
                f"is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, expected {allowed} "
                f"{list(shape)} for a {layer.out_features}x{layer.in_features} module of {kind} (group {group})",
            )
        if tensor.is_floating_point() and name != "weight_codes" and not torch.isfinite(tensor).all():
            raise refuse(name, "holds NaN or infinite values; the checkpoint is corrupt")
    return weight_from_stored(stored, kind, group, refuse)


def weight_from_stored(stored, kind, group, refuse) -> tuple[PackedWeight, torch.Tensor | None]:
    scale = stored["weight_scale"]
    if kind == "float8":
        return Fp8Weight.from_codes(stored["weight_codes"], scale), None
    if kind == "int8":
        return Int8Weight.from_codes(stored["weight_codes"], scale), None
    shift = stored["weight_shift"]
    if shift.dtype != scale.dtype:
        raise refuse("weight_shift", f"is {shift.dtype}, but weight_scale is {scale.dtype}; quanto makes both alike")
    codes = unpack(stored["weight_packed"], BITS[kind])
    # quanto: W = q * scale - shift; the kernel layer: W = (q - zero) * scale. A zero scale (a constant group) holds
    # no information beyond its shift, so its zero is taken as 0 (and that group's weights as 0, not -shift).
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.where(scale == 0, 0.0, shift.float() / safe.float())
    return Int4Weight.from_codes(codes, scale, zero, group), shift
