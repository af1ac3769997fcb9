"""``CompressedLinear`` and the compressed-tensors tensors behind it: phases 3 to 6 and the dequantize hook.

A scheme's weights live in one of qcore's kernel weights (:mod:`qcore.kernels`); what is read and written is
compressed-tensors' own layout, per module (``q`` signed codes, ``s`` scale, ``z`` zero point, ``g`` group)::

    pack-quantized   weight_packed int32 [out, ceil(in * bits / 32)]   pack_to_int32(q), 32 codes per `bits` words
                     weight_scale  float [out, in / g] | [out, 1] | [1]
                     weight_shape  int64 [2] = [out, in]
                     weight_zero_point int32 [ceil(out * bits / 32), in / g]   asymmetric only, packed along rows
    naive-quantized  weight int8 [out, in] (or float8_e4m3fn), weight_scale, weight_zero_point int8 (asymmetric)
    int-quantized    the same as naive, for W8A8 (activations quantized per token as the layer runs)
    float-quantized  weight float8_e4m3fn [out, in], weight_scale float [out, 1] | [1] | [ceil(out/r), ceil(in/c)]

and ``W = (q - z) * s``. Quantizing (phase 4 on a full-precision checkpoint) is compressed-tensors' own: min/max
per tensor, row, group or block, ``calculate_qparams``, then the format's compressor (``quantize`` and
``pack_to_int32``), so the stored tensors are the ones compressed-tensors itself writes; they are then read back
exactly as a checkpoint's would be. Imported only from inside the hooks: it imports torch and compressed-tensors.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    maybe_pad_tensor_for_block_quant,
)
from qcore import CheckpointError, ConfigError
from qcore.kernels import Fp8Weight, Int4Weight, Int8Weight, PackedLinear, PackedWeight
from torch import nn

from qcore_compressed_tensors.config import fit_problem

__all__ = [
    "CompressedLinear",
    "ct_scheme",
    "check_shape",
    "compress",
    "restore",
    "weight_from_codes",
    "stored_tensors",
]

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int64, torch.int32)
#: Strategies whose zero points pack-quantized packs along the rows (compressed-tensors' ``PACK_ZP_STRATS``).
_PACKED_ZERO_STRATEGIES = ("group", "channel")


def ct_scheme(scheme: dict[str, Any]) -> QuantizationScheme:
    """compressed-tensors' own ``QuantizationScheme`` for one of the config's (completed) group dicts."""
    return _parsed(json.dumps(scheme, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> QuantizationScheme:
    return QuantizationScheme.model_validate(json.loads(text))


class CompressedLinear(PackedLinear):
    """A Linear whose weight is a compressed-tensors scheme's, held as a qcore kernel weight (``self.weight``).

    Made empty on meta (phase 3), given its weight in phase 4 and its kernel in phase 6; ``forward`` quantizes the
    activations as the scheme says (dynamic, per token or group) unless the kernel does it itself, then runs one
    ``weight.matmul``. ``state_dict`` writes the tensors of the scheme's compressed-tensors format.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, scheme: dict[str, Any]):
        nn.Module.__init__(self)  # the weight arrives in phase 4; PackedLinear's constructor needs it now
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        #: compressed-tensors' arguments for the dynamic activation quantization, parsed once.
        self.input_args = ct_scheme(scheme).input_activations
        self.weight: PackedWeight | None = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_args is not None and self.weight.kernel != "scaled_mm":
            x = quantize_activations(x, self.input_args)
        return self.weight.matmul(x, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        for name, tensor in stored_tensors(self.weight, self.scheme).items():
            destination[prefix + name] = tensor

    def extra_repr(self) -> str:
        kernel = self.weight.kernel if self.weight is not None else "not loaded"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.scheme['format']}, kernel={kernel}"
        )


def quantize_activations(x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """``x`` quantized and dequantized with dynamic scales, as compressed-tensors' forward does it."""
    # compressed-tensors reduces a token's statistics over every dimension after the first two: [tokens, 1, in].
    rows = x.reshape(-1, 1, x.shape[-1])
    scale, zero_point = compute_dynamic_scales_and_zp(rows, args, module=None)
    return fake_quantize(rows, scale, zero_point, args).reshape(x.shape)


def check_shape(scheme: dict[str, Any], module_name: str, out_features: int, in_features: int) -> None:
    """Refuse, before any weight is read, a stored module whose shape its scheme's weights do not fit (a
    checkpoint's modules all fit: what did not was written into ``ignore``)."""
    why = fit_problem(scheme["weights"], in_features)
    if why is not None:
        raise ConfigError(
            f"compressed-tensors config: {why} of module {module_name} ({out_features}x{in_features}); the "
            f"checkpoint's config does not match its model: add the module to 'ignore' or fix its group's weights"
        )


# -- quantizing -----------------------------------------------------------------------------------------------


def compress(weight: torch.Tensor, scheme: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for a full-precision ``weight`` ``[out, in]`` (rounded to nearest).

    The statistics are each row's, group's or block's own minimum and maximum (compressed-tensors' minmax observer
    on the weight alone), turned into scales and zero points by its ``calculate_qparams`` and applied by the
    format's compressor, all in the weight's dtype.
    """
    ct = ct_scheme(scheme)
    low, high = _extremes(weight, ct.weights)
    scale, zero_point = calculate_qparams(low, high, ct.weights)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    return dict(BaseCompressor.get_value_from_registry(scheme["format"]).compress(state, ct))


def _extremes(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    if args.strategy == "tensor":
        return torch.aminmax(weight)
    if args.strategy == "channel":
        return weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    if args.strategy == "group":
        groups = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        return groups.amin(dim=-1), groups.amax(dim=-1)
    rows, cols = args.block_structure
    padded = maybe_pad_tensor_for_block_quant(weight, (rows, cols))  # zeros: min <= 0 <= max holds anyway
    blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))


# -- reading and writing the stored form ------------------------------------------------------------------------


def expected_tensors(scheme: dict[str, Any], out_features: int, in_features: int) -> dict[str, tuple[tuple, tuple]]:
    """Stored tensor name -> (shape, allowed dtypes) for one module of ``scheme``."""
    weights, fmt = scheme["weights"], scheme["format"]
    bits, strategy = weights["num_bits"], weights["strategy"]
    if strategy == "group":
        statistics = (out_features, in_features // weights["group_size"])
    elif strategy == "block":
        rows, cols = weights["block_structure"]
        statistics = (math.ceil(out_features / rows), math.ceil(in_features / cols))
    else:
        statistics = (out_features, 1) if strategy == "channel" else (1,)
    expected = {"weight_scale": (statistics, _SCALE_DTYPES)}
    if fmt == "pack-quantized":
        expected["weight_packed"] = ((out_features, math.ceil(in_features * bits / 32)), (torch.int32,))
        expected["weight_shape"] = ((2,), _INDEX_DTYPES)
    else:
        codes = torch.float8_e4m3fn if weights["type"] == "float" else torch.int8
        expected["weight"] = ((out_features, in_features), (codes,))
    if not weights["symmetric"]:
        packed = fmt == "pack-quantized" and strategy in _PACKED_ZERO_STRATEGIES
        zero_shape = (math.ceil(statistics[0] * bits / 32), statistics[1]) if packed else statistics
        expected["weight_zero_point"] = (zero_shape, (torch.int32,) if packed else (torch.int8,))
    return expected


def restore(
    stored: dict[str, torch.Tensor],
    scheme: dict[str, Any],
    out_features: int,
    in_features: int,
    module_name: str,
    file: str,
) -> PackedWeight:
    """The kernel weight for a module's stored tensors, after checking every one of them.

    :raises qcore.CheckpointError: a missing or unexpected tensor, a wrong dtype or shape, a ``weight_shape`` that is
        not the module's, non-finite scales, or 4-bit codes outside -8..7, naming the file and tensor.
    """

    def refuse(name: str, message: str) -> CheckpointError:
        return CheckpointError(message, file=file, tensor=f"{module_name}.{name}")

    weights, fmt = scheme["weights"], scheme["format"]
    expected = expected_tensors(scheme, out_features, in_features)
    if "weight" in stored and stored["weight"].is_floating_point() and stored["weight"].dtype in _SCALE_DTYPES:
        raise refuse(
            "weight",
            f"is stored in full precision ({stored['weight'].dtype}), but the config's {fmt} "
            f"scheme targets this module: the checkpoint was saved uncompressed, or the module belongs in "
            f"'ignore'",
        )
    for name in sorted(set(stored) - set(expected)):
        raise refuse(name, f"is not a tensor of {fmt} {_describe(weights)} weights; expected {sorted(expected)}")
    for name, (shape, dtypes) in expected.items():
        if name not in stored:
            raise refuse(name, f"is missing; {fmt} {_describe(weights)} weights store {sorted(expected)}")
        tensor = stored[name]
        # A per-tensor statistic may be stored as a scalar.
        fits = tuple(tensor.shape) == shape or (shape == (1,) and tensor.numel() == 1 and name != "weight_shape")
        if tensor.dtype not in dtypes or not fits:
            allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise refuse(
                name,
                f"is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, expected {allowed} "
                f"{list(shape)} for a {out_features}x{in_features} module of {_describe(weights)}",
            )
    scale = stored["weight_scale"].reshape(expected["weight_scale"][0])
    if not torch.isfinite(scale).all():
        raise refuse("weight_scale", "holds NaN or infinite scales; the checkpoint is corrupt")
    bits = weights["num_bits"]
    zero = stored.get("weight_zero_point")
    if fmt == "pack-quantized":
        if stored["weight_shape"].tolist() != [out_features, in_features]:
            raise refuse(
                "weight_shape",
                f"says {stored['weight_shape'].tolist()}, but the module is [{out_features}, {in_features}]",
            )
        codes = unpack_from_int32(stored["weight_packed"], bits, torch.Size((out_features, in_features)))
        if zero is not None and zero.dtype == torch.int32:
            zero = unpack_from_int32(zero, bits, torch.Size(scale.shape), packed_dim=0)
    else:
        codes = stored["weight"]
    if weights["type"] == "float":
        block = tuple(weights["block_structure"]) if weights["strategy"] == "block" else None
        return Fp8Weight.from_codes(codes, scale, block)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for name, values in (("weight", codes), ("weight_zero_point", zero)):
        if (
            bits < 8
            and values is not None
            and values.numel()
            and not low <= int(values.min()) <= int(values.max()) <= high
        ):
            raise refuse(name, f"holds values outside {low}..{high}, the range of {bits}-bit codes")
    return weight_from_codes(codes, scale, zero, weights, out_features, in_features)


def weight_from_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    weights: dict[str, Any],
    out_features: int,
    in_features: int,
) -> PackedWeight:
    """The int4/int8 kernel weight for compressed-tensors' signed ``codes``, ``scale`` and signed ``zero`` point."""
    bits = weights["num_bits"]
    group = weights["group_size"] if weights["strategy"] == "group" else in_features
    scale = scale.reshape(-1, scale.shape[-1]).expand(out_features, -1)
    zero = None if zero is None else zero.reshape(scale.shape[0] if zero.numel() > 1 else 1, -1).expand_as(scale)
    if bits == 4:
        unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
        return Int4Weight.from_codes(unsigned, scale, None if zero is None else zero.to(torch.float32) + 8, group)
    return Int8Weight.from_codes(codes, scale, None if zero is None else zero.to(torch.float32), group)


def stored_tensors(weight: PackedWeight, scheme: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`restore`: the module's tensors in its compressed-tensors format."""
    weights, fmt = scheme["weights"], scheme["format"]
    bits, strategy = weights["num_bits"], weights["strategy"]
    shape = expected_tensors(scheme, weight.out_features, weight.in_features)["weight_scale"][0]
    scale = weight.scale
    codes = weight.codes()
    zero = None
    if weights["type"] == "int":
        if strategy == "tensor":
            scale = scale[:1, :1]
        zero = None if weight.zero is None else (weight.zero[: scale.shape[0]] - (8 if bits == 4 else 0)).to(torch.int8)
        if bits == 4:
            codes = (codes.to(torch.int16) - 8).to(torch.int8)
    tensors = {"weight_scale": scale.reshape(shape).contiguous()}
    if fmt == "pack-quantized":
        tensors["weight_packed"] = pack_to_int32(codes, bits)
        tensors["weight_shape"] = torch.tensor([weight.out_features, weight.in_features])
    else:
        tensors["weight"] = codes
    if zero is not None:
        zero = zero.reshape(shape)
        packed = fmt == "pack-quantized" and strategy in _PACKED_ZERO_STRATEGIES
        tensors["weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0) if packed else zero.contiguous()
    return tensors


def _describe(weights: dict[str, Any]) -> str:
    kind = f"{weights['type']}{weights['num_bits']}"
    if weights["strategy"] == "group":
        return f"{kind} group {weights['group_size']}"
    if weights["strategy"] == "block":
        return f"{kind} blocks {weights['block_structure']}"
    return f"{kind} per {weights['strategy']}"
