"""Whether FP8 can run here, and which matmul it gets: the checks ``qcore backends`` and ``validate`` (phase 1) show.

torch stores float8 on every device since 2.1, so FP8 weights load anywhere. The matmul is chosen per module by
qcore's kernel layer in ``optimize_runtime`` (phase 6): ``torch._scaled_mm`` for per-tensor scales on a GPU with
FP8 tensor cores (sm89+), dequantize + matmul otherwise (block scales, CPUs, older GPUs); on a CPU ``_scaled_mm``
runs but was measured slower than dequantizing (the plugin README has the numbers). Nothing here imports torch
unless asked about the device.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

__all__ = ["unavailable_reason", "kernel_note"]

#: float8_e4m3fn and float8_e8m0fnu tensors.
_MIN_TORCH = Version("2.7")


def unavailable_reason() -> str | None:
    """Why FP8 weights cannot be held here, with the fix; ``None`` when they can."""
    try:
        installed = Version(importlib.metadata.version("torch").split("+")[0])
    except importlib.metadata.PackageNotFoundError:
        return "torch is not installed: pip install torch"
    if installed < _MIN_TORCH:
        return f"torch {installed} has no float8_e8m0fnu dtype: pip install -U 'torch>={_MIN_TORCH}'"
    return None


def kernel_note() -> str:
    return (
        "kernel: torch._scaled_mm for per-tensor scales on FP8 GPUs (sm89+); dequantize + matmul for block scales "
        "and on CPU (measured faster there)"
    )
