"""What runs here, for ``qcore backends`` (registration) and the report of ``optimize_runtime`` (phase 6): which
qcore.kernels kernel each quanto weight type gets. Imports neither torch nor optimum-quanto.

    int8     Int8Weight: _weight_int8pack_mm, or the int4 kernels on two halves (CPU bf16, decode batches)
    int4     Int4Weight: int4pack-cpu (CPU) / tinygemm-cuda (CUDA bf16) for groups of 32..256, else dequantize
    int2     Int4Weight on 2-bit codes (the kernel layer has no 2-bit kernel): the int4 kernels, 4 bits in memory
    float8   Fp8Weight: torch._scaled_mm where the GPU has FP8, dequantize + matmul elsewhere

optimum-quanto's own C++/CUDA extensions are never built or loaded.
"""

from __future__ import annotations

__all__ = ["kernel_notes"]


def kernel_notes() -> str:
    """One line for ``qcore backends``."""
    return (
        "kernels: qcore.kernels (int8 -> _weight_int8pack_mm or int4 halves; int4/int2 -> torch int4 for groups of "
        "32..256; float8 -> _scaled_mm on FP8 GPUs, dequantize elsewhere); quanto's C++ extension is never built"
    )
