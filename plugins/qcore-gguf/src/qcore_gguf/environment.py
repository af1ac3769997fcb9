"""Which matmul each GGUF block type gets: the account ``optimize_runtime`` (phase 6) reports for
``model.qcore_kernels``.

Q4_0 and Q4_1 are group-32 affine int4 and Q8_0 group-32 int8, so they run ``qcore.kernels``' int4 kernels (torch's
``_weight_int4pack_mm_for_cpu`` on CPU, tinygemm on CUDA; Q8_0 as two int4 halves) wherever the kernel layer takes
the shape, device and dtype, and its dequantize fallback elsewhere. Every other type (Q5_0, Q5_1, the K-quants,
F32/F16/BF16) is dequantized from its blocks in each forward, as diffusers' GGUF layers do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

__all__ = ["summarize"]


def summarize(layers: Iterable) -> str:
    """One line: each kernel that runs, the block types it runs for and how many modules use it."""
    from qcore.kernels import KERNELS

    counts: Counter[tuple[str, str]] = Counter()
    for layer in layers:
        kernel = layer.packed.kernel if layer.packed is not None else "blocks"
        counts[kernel, layer.type_name] += 1
    names = {**KERNELS, "blocks": "GGUF blocks dequantized per forward"}
    by_kernel: dict[str, list[str]] = {}
    for (kernel, type_name), count in sorted(counts.items()):
        by_kernel.setdefault(kernel, []).append(f"{count} {type_name}")
    return "; ".join(f"{names[kernel]} ({', '.join(parts)})" for kernel, parts in by_kernel.items())
