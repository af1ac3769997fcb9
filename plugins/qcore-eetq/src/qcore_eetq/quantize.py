"""EETQ's numbers: the int8 quantization of phase 4 and the weight layouts of phases 4 and 6.

Quantization (``load_weight`` on a full-precision checkpoint), per output row ``n`` of a weight ``W[N, K]``::

    scale[n] = float16(max_k |W[n, k]| / 127)          computed in float32, then rounded to nearest float16
    q[n, k]  = clamp(round(W[n, k] / scale[n]), -127, 127)   divided by the float16 scale that is stored;
                                                             round = half to even (torch.round)
    q[n, :]  = 0 where scale[n] == 0                   an all-zero row (or one whose scale underflows float16)

and the weight it stands for is ``q * scale`` (:func:`dequantize`). EETQ's CUDA ``quant_weights`` (FasterTransformer
code) divides by 128 and clamps to [-128, 127] instead; the stored scales make either kind of checkpoint exact for
any kernel, and /127 never clips the largest weight of a row.

Layouts: qcore keeps and saves ``q`` as plain rows ``[N, K]`` (:data:`ROWS`), the layout torch's int8 matmul takes.
The eetq package's GEMM needs its own layout, which depends on the GPU architecture; phase 6 converts to it with
eetq's own ``preprocess_weights`` (:data:`EETQ_KERNEL`, held in memory only) and saving converts back with the exact
inverse of that same function (:func:`rows_from_eetq_layout`).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

__all__ = ["ROWS", "EETQ_KERNEL", "quantize", "dequantize", "eetq_layout", "rows_from_eetq_layout"]

#: ``weight_layout`` code of plain row-major ``int8[out_features, in_features]``: the only layout qcore saves.
ROWS = 0
#: ``weight_layout`` code of eetq's GPU-specific ``int8[in_features, out_features]`` layout; never saved.
EETQ_KERNEL = 1

_QMAX = 127


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8[N, K], scale float16[N])`` of a ``[N, K]`` weight, on the weight's device (formula above).

    A row whose scale is not finite (a NaN/inf weight, or ``max|w| > 127 * 65504``) gets a non-finite scale; the
    caller refuses it.
    """
    weight = weight.float()
    scale = (weight.abs().amax(dim=1) / _QMAX).to(torch.float16)
    divisor = scale.float().unsqueeze(1)
    q = torch.where(divisor > 0, torch.round(weight / divisor), 0.0).clamp_(-_QMAX, _QMAX)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight in ``dtype`` that ``q`` and ``scale`` stand for: ``q * scale`` in float32, rounded once."""
    return (q.float() * scale.float().unsqueeze(1)).to(dtype)


def eetq_layout(q: torch.Tensor, eetq: ModuleType) -> torch.Tensor:
    """``q[N, K]`` in eetq's GEMM layout for this GPU (``int8[K, N]``, on ``q``'s device), made by eetq itself."""
    # preprocess_weights takes the transposed [K, N] matrix on the CPU, as eetq's own layers call it.
    return eetq.preprocess_weights(q.t().contiguous().cpu()).to(q.device)


def rows_from_eetq_layout(kernel_weight: torch.Tensor, eetq: ModuleType) -> torch.Tensor:
    """The inverse of :func:`eetq_layout`: plain ``int8[N, K]`` rows on ``kernel_weight``'s device."""
    k, n = kernel_weight.shape
    source, offset = _eetq_permutation(k, n, eetq)
    values = (kernel_weight.flatten().cpu().view(torch.uint8) - offset).view(torch.int8)
    flat = torch.empty(k * n, dtype=torch.int8)
    flat[source] = values
    return flat.view(k, n).t().contiguous().to(kernel_weight.device)


@functools.lru_cache(maxsize=4)
def _eetq_permutation(k: int, n: int, eetq: ModuleType) -> tuple[torch.Tensor, int]:
    """Where each byte of eetq's layout comes from in the ``[K, N]`` input, and the constant eetq adds to every byte.

    eetq's transform moves bytes (it permutes, transposes and interleaves) and adds 128 to each. Rather than
    re-implementing it for every GPU architecture, ask eetq: transform an all-zero matrix to read the constant, then
    matrices whose bytes are the base-256 digits of each element's own index to read where every byte went. A few
    calls per weight shape; cached because a model repeats a handful of shapes.
    """
    offset = int(eetq.preprocess_weights(torch.zeros(k, n, dtype=torch.int8)).view(torch.uint8).flatten()[0])
    index = torch.arange(k * n, dtype=torch.int64)
    source = torch.zeros(k * n, dtype=torch.int64)
    shift = 0
    while (k * n - 1) >> shift:
        digit = ((index >> shift) & 255).to(torch.uint8).view(torch.int8).view(k, n)
        moved = eetq.preprocess_weights(digit).flatten().view(torch.uint8) - offset
        source |= moved.to(torch.int64) << shift
        shift += 8
    if not torch.equal(torch.sort(source).values, index):
        raise RuntimeError(f"eetq's preprocess_weights is not a byte permutation for shape [{k}, {n}]")
    return source.to(torch.int32) if k * n < 2**31 else source, offset
