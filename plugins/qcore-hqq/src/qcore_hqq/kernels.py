"""Phase 6 (``optimize_runtime``): which hqq backend each quantized layer runs, pinned per layer.

hqq chooses its forward pass with a class-wide switch, ``HQQLinear.set_backend``, which changes every ``HQQLinear``
in the process at once (and is re-applied by every new ``HQQLinear``). qcore instead binds the chosen backend's
forward to each layer it loaded, so loading a CUDA model cannot change the kernels of a CPU model loaded earlier,
and ``HQQLinear.set_backend`` calls made elsewhere do not reach qcore's layers. :func:`pin_backend` is the way to
change a loaded model's backend afterwards.

The choice (measurements in the README):

* CUDA: ``PYTORCH_COMPILE`` (hqq's dequantize + matmul under ``torch.compile``), hqq's fastest backend that needs
  no separately built extension and supports both axes and backpropagation; ``PYTORCH`` when triton is missing.
* CPU: ``PYTORCH`` (eager dequantize + matmul). Compiling on CPU needs a C++ toolchain at run time, costs seconds
  per layer shape before the first token, and changes bf16/fp16 results in the last bit; eager keeps the output
  bit-identical to hqq's default ``HQQLinear``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from hqq.core.quantize import HQQBackend, HQQLinear

__all__ = ["choose_backend", "pin_backend", "pin_backends"]


def choose_backend(device: torch.device) -> HQQBackend:
    """The fastest hqq backend for layers on ``device`` that keeps training (LoRA) possible."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return HQQBackend.PYTORCH_COMPILE
    return HQQBackend.PYTORCH


def pin_backend(layer: HQQLinear, backend: HQQBackend) -> None:
    """Make ``layer`` run ``backend`` whatever ``HQQLinear.set_backend`` says (an instance-level ``forward``)."""
    layer.forward = getattr(layer, backend.value)


def pin_backends(layers: Iterable[HQQLinear]) -> str:
    """Pin the best backend on each layer for its device; returns the choice as reported to ``qcore_kernels``."""
    chosen: dict[str, str] = {}
    for layer in layers:
        device = layer.W_q.device
        backend = choose_backend(device)
        pin_backend(layer, backend)
        chosen.setdefault(device.type, backend.name)
    if len(chosen) == 1:
        return f"hqq {next(iter(chosen.values()))}"
    return "hqq " + ", ".join(f"{backend} ({device})" for device, backend in sorted(chosen.items()))
