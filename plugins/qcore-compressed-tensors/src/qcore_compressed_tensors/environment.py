"""What runs here, for ``qcore backends`` (registration) and the ``validate`` log (phase 1): which qcore.kernels kernel
each compressed-tensors scheme gets on each device. Imports neither torch nor compressed-tensors.

    W4A16 / W4A16_ASYM  int4 groups of 32..256: int4pack-cpu (CPU), tinygemm-cuda (CUDA sm80+, bfloat16)
    W8A16               per-channel symmetric: int8pack; groups: the int4 kernels on two halves
    W8A8                as W8A16, activations quantized to int8 per token before the matmul
    FP8_DYNAMIC         _scaled_mm on CUDA sm89+ (activations to fp8 per token); dequantize elsewhere
    FP8_BLOCK           dequantize (torch._scaled_mm takes no block scales), activations to fp8 per group

Every other case dequantizes the weight and runs torch's matmul: right everywhere, only slower.
"""

from __future__ import annotations

__all__ = ["kernel_notes"]


def kernel_notes() -> str:
    """One line for ``qcore backends``."""
    return (
        "kernels: int4 groups of 32..256 -> torch int4 (CPU, CUDA); int8 -> _weight_int8pack_mm or int4 halves; "
        "fp8 -> _scaled_mm on CUDA sm89+; dequantize + matmul elsewhere"
    )
