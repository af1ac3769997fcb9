"""Phase 6 (``optimize_runtime``): which hqq backend each quantized layer runs, pinned per layer.

hqq chooses its forward pass with a class-wide switch, ``HQQLinear.set_backend``, which changes every ``HQQLinear``
in the process at once (and is re-applied by every new ``HQQLinear``). qcore instead binds the chosen backend's
forward to each layer it loaded, so loading a CUDA model cannot change the kernels of a CPU model loaded earlier,
and ``HQQLinear.set_backend`` calls made elsewhere do not reach qcore's layers. :func:`pin_backend` is the way to
change a loaded model's backend afterwards.

The choice (measurements in the README):

* CUDA: ``PYTORCH_COMPILE`` (hqq's dequantize + matmul under ``torch.compile``), hqq's fastest backend that needs
  no separately built extension and supports both axes and backpropagation; ``PYTORCH`` when triton is missing.
* CPU: 4-bit and 8-bit layers quantized along axis 1 run qcore's kernel layer (:mod:`qcore.kernels`) wherever it
  has a kernel for them: hqq's ``W = (W_q - zero) * scale`` per group is exactly :class:`~qcore.kernels.Int4Weight`
  (8-bit: :class:`~qcore.kernels.Int8Weight` with codes and zeros shifted by 128), which torch's CPU int4 kernel
  runs in bfloat16 (groups of 32..256, out_features a multiple of 16). Numerics: the kernel computes
  ``(q - 8) * s + (8 - z) * s`` with both terms rounded to bfloat16 where hqq computes ``(q - z) * s`` in bfloat16;
  the two differ by a few bfloat16 roundings of each weight, bounded in the tests by the kernel layer's
  ``error_bound`` plus hqq's own rounding. The kernel holds the only copy of the codes: ``W_q`` becomes a one-byte
  placeholder of its shape, and ``state_dict``/``dequantize``/``unpack`` put the exact ``W_q`` back while they run,
  so saving writes what hqq wrote. Layers the kernel layer does not take (float16/float32 models, other shapes,
  axis 0, 2/3-bit, quantized scales or zeros, offloaded metadata) run ``PYTORCH`` (eager dequantize + matmul):
  compiling on CPU needs a C++ toolchain at run time, costs seconds per layer shape before the first token, and
  changes bf16/fp16 results in the last bit; eager keeps the output bit-identical to hqq's default ``HQQLinear``.
"""

from __future__ import annotations

import functools
import importlib.util
import types
from collections.abc import Iterable

import torch
from hqq.core.quantize import HQQBackend, HQQLinear
from qcore.kernels import KERNELS, Int4Weight, Int8Weight, PackedWeight
from torch import nn

__all__ = ["choose_backend", "pin_backend", "pin_backends", "kernel_weight", "use_kernel_weight", "hqq_codes"]

#: hqq methods that read ``W_q``: while one runs on a layer whose kernel holds the codes, ``W_q`` is put back.
_READS_W_Q = ("state_dict", "dequantize", "unpack")


def choose_backend(device: torch.device) -> HQQBackend:
    """The fastest hqq backend for layers on ``device`` that keeps training (LoRA) possible."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return HQQBackend.PYTORCH_COMPILE
    return HQQBackend.PYTORCH


def pin_backend(layer: HQQLinear, backend: HQQBackend) -> None:
    """Make ``layer`` run ``backend`` whatever ``HQQLinear.set_backend`` says (an instance-level ``forward``)."""
    layer.forward = getattr(layer, backend.value)


def pin_backends(layers: Iterable[HQQLinear]) -> str:
    """Give each layer the kernel layer's kernel where it has one, else pin the best hqq backend for its device;
    returns the choice as reported to ``qcore_kernels``."""
    chosen: dict[str, int] = {}
    for layer in layers:
        device = layer.W_q.device
        weight = kernel_weight(layer) if device.type == "cpu" else None
        if weight is not None and weight.select(device, layer.compute_dtype, batch_hint=1) != "dequantize":
            use_kernel_weight(layer, weight)
            name = f"qcore.kernels {KERNELS[weight.kernel]}"
        else:
            backend = choose_backend(device)
            pin_backend(layer, backend)
            name = f"hqq {backend.name}" + (f" ({device.type})" if device.type != "cpu" else "")
        chosen[name] = chosen.get(name, 0) + 1
    if len(chosen) == 1:
        return next(iter(chosen)).removesuffix(" (cuda)")
    return "; ".join(f"{name} for {count} layers" for name, count in sorted(chosen.items()))


def kernel_weight(layer: HQQLinear) -> PackedWeight | None:
    """The :mod:`qcore.kernels` weight equal to ``layer``'s, or ``None`` for settings outside its forms."""
    meta = layer.meta
    if (
        meta.get("axis") != 1
        or meta.get("nbits") not in (4, 8)
        or meta.get("packing") not in ("4bit_u8", "8bit_u8")
        or meta.get("quant_scale")
        or meta.get("quant_zero")
        or meta.get("view_as_float")
        or "zero_scale" in meta
        or layer.offload_meta
    ):
        return None
    out_features, in_features = meta["shape"]
    group_size = meta["group_size"]
    scale = meta["scale"].reshape(out_features, in_features // group_size)
    zero = meta["zero"].reshape(out_features, in_features // group_size)
    if meta["nbits"] == 4:
        rows = torch.cat((layer.W_q >> 4, layer.W_q & 15))  # hqq packs row r with row r + rows / 2
        return Int4Weight.from_codes(rows.reshape(out_features, in_features), scale, zero, group_size)
    codes = (layer.W_q.to(torch.int16) - 128).to(torch.int8).reshape(out_features, in_features)
    return Int8Weight.from_codes(codes, scale, zero.to(torch.float32) - 128, group_size)


def hqq_codes(weight: PackedWeight, meta: dict) -> torch.Tensor:
    """The inverse of :func:`kernel_weight` for the codes: ``W_q`` exactly as hqq packed it."""
    rows = weight.codes().reshape(-1, meta["group_size"])
    if meta["nbits"] == 4:
        half = rows.shape[0] // 2
        return (rows[:half] << 4) | rows[half:]
    return (rows.to(torch.int16) + 128).to(torch.uint8)


def use_kernel_weight(layer: HQQLinear, weight: PackedWeight) -> None:
    """Make ``layer`` compute with ``weight`` (already selected), which then holds the only copy of its codes."""
    layer.qcore_weight = weight
    layer.W_q = nn.Parameter(torch.zeros((), dtype=layer.W_q.dtype).expand(layer.W_q.shape), requires_grad=False)
    layer.forward = types.MethodType(_forward_with_kernel, layer)
    for name in _READS_W_Q:
        setattr(layer, name, _with_codes(layer, getattr(HQQLinear, name).__get__(layer)))


def _forward_with_kernel(layer: HQQLinear, x: torch.Tensor) -> torch.Tensor:
    return layer.qcore_weight.matmul(x, layer.bias)


def _with_codes(layer: HQQLinear, method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        placeholder = layer.W_q
        layer.W_q = nn.Parameter(hqq_codes(layer.qcore_weight, layer.meta), requires_grad=False)
        try:
            return method(*args, **kwargs)
        finally:
            layer.W_q = placeholder

    return call
