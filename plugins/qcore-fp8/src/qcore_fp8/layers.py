"""The torch side of phases 3 to 6: :class:`Fp8Linear`, made empty on meta in phase 3, filled in phase 4 (quantized
from the full-precision weight with :func:`quantize`, or restored from stored tensors with :func:`restore` after
:func:`check_stored`), given its kernel in phase 6, and saved by its ``state_dict``.

Its tensors are transformers' ``FP8Linear`` names: ``weight`` (float8_e4m3fn ``[out, in]``), ``weight_scale_inv``
(float32, or float8_e8m0fnu for ``scale_fmt: ue8m0``: ``[ceil(out / b0), ceil(in / b1)]`` for blocks ``b``, a scalar
per tensor), ``activation_scale`` (float32 scalar, ``activation_scheme: static`` only) and ``bias``. The weight is a
:class:`qcore.kernels.Fp8Weight` over those very tensors, so nothing is held twice.
"""

from __future__ import annotations

import math
from typing import Any

import qcore
import torch
from qcore.kernels import Fp8Weight
from torch import nn

__all__ = ["Fp8Linear", "quantize", "check_stored", "restore", "FP8_DTYPE"]

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max
_FP8_MIN = torch.finfo(FP8_DTYPE).min


class Fp8Linear(nn.Module):
    """``y = x @ (weight * weight_scale_inv).T + bias``, the matmul run by :class:`qcore.kernels.Fp8Weight`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block: tuple[int, int] | None,
                 static_activations: bool, dtype: torch.dtype):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        #: Whether the model's module was a transformers ``Conv1D`` (its plain weight is stored [in, out]).
        self.transposed = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        grid = () if block is None else (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
        self.weight_scale_inv = nn.Parameter(torch.empty(grid, dtype=torch.float32), requires_grad=False)
        if static_activations:
            self.activation_scale = nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("activation_scale", None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.packed: Fp8Weight | None = None

    def attach(self) -> Fp8Weight:
        """The kernel layer's weight over this module's own ``weight`` and ``weight_scale_inv`` (no copy)."""
        scale = self.weight_scale_inv
        if scale.dtype != torch.float32:  # ue8m0: a power of two per block, exactly representable in float32
            scale = scale.to(torch.float32)
        self.packed = Fp8Weight.from_codes(self.weight.data, scale.data, self.block)
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.packed if self.packed is not None else self.attach()
        return weight.matmul(x, self.bias.to(x.dtype) if self.bias is not None else None)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.packed if self.packed is not None else self.attach()
        return weight.dequantize(dtype)

    def extra_repr(self) -> str:
        kernel = self.packed.kernel if self.packed is not None else "dequantize"
        block = "per tensor" if self.block is None else f"blocks {self.block[0]}x{self.block[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {block}, kernel={kernel}"


def quantize(weight: torch.Tensor, block: tuple[int, int] | None, scale_fmt: str = "float"):
    """``(fp8 codes, weight_scale_inv)`` of a full-precision ``[out, in]`` weight, as transformers' ``Fp8Quantize``
    computes them: per block, ``scale = 448 / max|w|`` (1 for an all-zero block) in float32, the codes
    ``clamp(w * scale)`` cast to e4m3, and the stored inverse ``1 / scale``; for ``ue8m0`` the inverse is first
    rounded up to a power of two and the forward scale taken as its exact reciprocal.

    transformers leaves a weight whose sizes the block does not divide in full precision; here the edge blocks are
    simply smaller (their maximum taken over the part that exists), as DeepSeek-V3's own checkpoints store them.
    """
    rows, columns = weight.shape
    block_rows, block_columns = block if block is not None else (rows, columns)
    grid = (math.ceil(rows / block_rows), math.ceil(columns / block_columns))
    value = weight.to(torch.float32)
    padded = value
    if (grid[0] * block_rows, grid[1] * block_columns) != (rows, columns):
        padded = value.new_zeros(grid[0] * block_rows, grid[1] * block_columns)
        padded[:rows, :columns] = value
    tiles = padded.reshape(grid[0], block_rows, grid[1], block_columns)
    max_abs = tiles.abs().amax(dim=(1, 3))
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = _FP8_MAX / safe
    scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
    inverse = (1.0 / scales).to(torch.float32)
    if scale_fmt == "ue8m0":
        inverse = torch.pow(2.0, torch.ceil(torch.log2(inverse.clamp(min=torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inverse
        inverse = inverse.to(torch.float8_e8m0fnu)
    codes = torch.clamp(tiles * scales[:, None, :, None], min=_FP8_MIN, max=_FP8_MAX).to(FP8_DTYPE)
    codes = codes.reshape(padded.shape)[:rows, :columns].contiguous()
    return codes, (inverse.reshape(()) if block is None else inverse)


def check_stored(layer: Fp8Linear, module_name: str, infos: dict[str, Any], file: str, scale_fmt: str) -> None:
    """Refuse, from the header alone, a module whose stored tensors do not fit its shape and the config."""

    def fail(tensor: str, message: str) -> qcore.CheckpointError:
        return qcore.CheckpointError(
            f"{message}; the checkpoint is corrupt or not in transformers' FP8 format", file=file,
            tensor=f"{module_name}.{tensor}",
        )  # fmt: skip

    if "weight" not in infos:
        raise fail("weight", "the module has a weight_scale_inv but no weight")
    if "weight_scale_inv" not in infos:
        raise fail("weight_scale_inv", "the fp8 weight has no weight_scale_inv beside it")
    unknown = sorted(set(infos) - {"weight", "weight_scale_inv", "activation_scale", "bias"})
    if unknown:
        raise fail(unknown[0], "is not a tensor of an FP8 layer (weight, weight_scale_inv, activation_scale, bias)")
    shape, dtype = infos["weight"].shape, infos["weight"].dtype
    if dtype != "F8_E4M3":
        raise fail("weight", f"stored as {dtype}, but the config names float8 e4m3 (F8_E4M3)")
    if tuple(shape) != (layer.out_features, layer.in_features):
        raise fail(
            "weight", f"shape {list(shape)} does not fit the model's [{layer.out_features}, {layer.in_features}]"
        )
    shape, dtype = infos["weight_scale_inv"].shape, infos["weight_scale_inv"].dtype
    expected_dtype = "F8_E8M0" if scale_fmt == "ue8m0" else "F32"
    if dtype != expected_dtype:
        raise fail("weight_scale_inv", f"stored as {dtype}; scale_fmt {scale_fmt!r} stores {expected_dtype}")
    grid = tuple(layer.weight_scale_inv.shape)
    fits = tuple(shape) == grid or (layer.block is None and math.prod(shape) == 1)
    if not fits:
        blocks = "one scale" if layer.block is None else f"one scale per {layer.block[0]}x{layer.block[1]} block"
        raise fail(
            "weight_scale_inv", f"shape {list(shape)} does not match the weight's blocks ({blocks}: {list(grid)})"
        )
    if "activation_scale" in infos and math.prod(infos["activation_scale"].shape) != 1:
        raise fail("activation_scale", f"shape {list(infos['activation_scale'].shape)} is not one scale")


def restore(layer: Fp8Linear, module_name: str, stored: dict[str, torch.Tensor], device: torch.device,
            file: str) -> dict[str, torch.Tensor]:  # fmt: skip
    """The module's attributes from its stored tensors, after checking the scales are usable numbers."""
    scale = stored["weight_scale_inv"]
    as_float = scale.to(torch.float32)
    if not bool(torch.isfinite(as_float).all()) or bool((as_float <= 0).any()):
        raise qcore.CheckpointError(
            "holds a zero, negative or non-finite scale; the checkpoint is corrupt", file=file,
            tensor=f"{module_name}.weight_scale_inv",
        )  # fmt: skip
    values = {
        "weight": stored["weight"].to(device),
        "weight_scale_inv": scale.reshape(layer.weight_scale_inv.shape).to(device),
    }
    if "activation_scale" in stored and layer.activation_scale is not None:
        values["activation_scale"] = stored["activation_scale"].reshape(()).to(device)
    return values
