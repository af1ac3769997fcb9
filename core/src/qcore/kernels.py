"""Packed-weight matmuls shared by every backend: the kernel layer under phases 4 and 6.

A backend turns its stored form into one of three weight objects in ``load_weight`` (phase 4), asks it for the
fastest kernel of the device and dtype it runs in with :meth:`PackedWeight.select` in ``optimize_runtime``
(phase 6), and runs ``y = weight.matmul(x, bias)`` in its forward; no backend writes its own matmul or packing.

* :class:`Int4Weight`: group-wise affine int4, ``W[o, i] = (q[o, i] - zero[o, i // g]) * scale[o, i // g]`` (GGUF
  Q4_0/Q4_1, GPTQ, AWQ, compressed-tensors pack-quantized, HQQ 4-bit axis 1, quanto int4).
* :class:`Int8Weight`: int8, ``W = (q - zero) * scale`` per output row or group-wise (EETQ, GGUF Q8_0, HQQ 8-bit).
* :class:`Fp8Weight`: float8 codes times a per-tensor, per-row or block scale (FP8, compressed-tensors fp8).

Kernels (:data:`KERNELS`), each tried only where it computes the right thing, the dequantize-then-matmul fallback
everywhere else (a refusal never raises):

=================  ==========================================  ==============================================
kernel             op                                          where
=================  ==========================================  ==============================================
``int4pack-cpu``   ``aten._weight_int4pack_mm_for_cpu``        CPU bfloat16; int4, and int8 as two int4 halves
                                                               (group-wise, or per-row at batch <= 2);
                                                               out % 16 == 0, group a multiple of 32
``tinygemm-cuda``  ``aten._weight_int4pack_mm``                CUDA sm80+, bfloat16; int4 and int8 as above;
                                                               out % 8 == 0, in % 32 == 0, group 32..256
``int8pack``       ``torch._weight_int8pack_mm``               symmetric per-row int8; CPU: bfloat16 with
                                                               in % 16 == 0 (other sizes crash torch 2.13)
``scaled_mm``      ``torch._scaled_mm``                        fp8 with per-tensor/per-row scales on CUDA
                                                               sm89+ (activations quantized per row)
``dequantize``     ``F.linear(x, w.dequantize(x.dtype))``      everything else
=================  ==========================================  ==============================================

Which one is fastest was measured on CPU (``benchmarks/kernels.py``; the table is in ``benchmarks/README.md``): the
int4 kernel beats the dense bfloat16 matmul at decode batch sizes, the CPU ``_scaled_mm`` never does, so a CPU fp8
weight dequantizes.

Numerics. :meth:`PackedWeight.dequantize` is the reference: the weight computed in float32 and rounded once to the
requested dtype. A kernel differs from ``x @ w.dequantize(x.dtype).T`` only because it rounds its own statistics to
the activation dtype (the int4 kernels compute ``(q - 8) * s + z'`` with ``s`` and ``z' = (8 - zero) * s`` rounded,
``int8pack`` rounds ``scale``, ``scaled_mm`` also rounds the activations to fp8) and accumulates in another order.
:meth:`PackedWeight.error_bound` gives the bound for each output element, ``|x| @ E.T + (2u + 2K eps32) |x| @ |W|.T``
with ``E`` the per-weight error of those roundings, ``u`` the unit roundoff of the activation dtype and ``eps32``
float32's; the tests hold every kernel to it.

Storage. After ``select`` a weight holds one copy of its codes, in the chosen kernel's layout; :meth:`codes`,
``scale`` and ``zero`` always give back exactly what ``from_codes`` received, so saving after ``select`` writes
what a reload reads. torch's int4 layouts depend on the CPU's vector width and the GPU tile shape, so they are never
saved: :meth:`codes` unpacks them (the CPU layout by its inverse, verified on this machine before its first use; the
CUDA tile layout through the kernel itself, multiplying by the identity, which is exact for integers 0..15).
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qcore import memory

__all__ = ["KERNELS", "PackedWeight", "Int4Weight", "Int8Weight", "Fp8Weight", "PackedLinear", "describe"]

#: Weights of at least this many elements return the heap their repack freed to the system (1 MiB of int32 codes).
_RELEASE_HEAP_AFTER = 2**18

#: Every kernel name a weight can report, with the op it runs.
KERNELS = {
    "int4pack-cpu": "torch.ops.aten._weight_int4pack_mm_for_cpu",
    "tinygemm-cuda": "torch.ops.aten._weight_int4pack_mm",
    "int8pack": "torch._weight_int8pack_mm",
    "scaled_mm": "torch._scaled_mm",
    "dequantize": "dequantize + torch matmul",
}

#: Group sizes torch's int4 kernels take (CPU and CUDA alike).
_INT4_GROUPS = (256, 128, 64, 32)
#: torch's CPU int4 layout packs output rows in blocks of 16 (a tail block of 16/32/48 rows included).
_CPU_INT4_ROWS = 16
#: Codes packed for the CPU int4 kernel per call, into one preallocated tensor: bounds the int32 temporary at 2 MiB.
_PACK_ROWS_ELEMENTS = 2**19
#: tinygemm tiles the output in 8 rows and the input in 16 x innerKTiles columns.
_CUDA_INT4_ROWS = 8
#: torch 2.13's CPU bfloat16 int8 kernel reads K in steps of 16 with no tail: other sizes give garbage or a crash.
_CPU_INT8_K_STEP = 16
#: The alignment torch gives every CPU allocation; its CPU int8 kernel reads with aligned vector loads and crashes on
#: a tensor that starts elsewhere (a view into a memory-mapped checkpoint can start anywhere).
_CPU_ALIGNMENT = 64
#: The largest batch at which two int4 halves beat torch's CPU int8 kernel for a per-row int8 weight (measured).
_CPU_INT8_HALVES_MAX_BATCH = 2
#: Columns of the identity multiplied at a time when reading codes back out of tinygemm's tile layout.
_IDENTITY_CHUNK = 1024


class PackedWeight(abc.ABC):
    """What the three weight kinds share: kernel choice, the one-call matmul, and the reference dequantization."""

    kind = "packed"
    #: Elements selected on CPU since the heap was last returned to the system (see :meth:`select`).
    _unreleased = 0

    def __init__(self, out_features: int, in_features: int):
        self.out_features = out_features
        self.in_features = in_features
        #: The kernel ``matmul`` runs (a key of :data:`KERNELS`); until ``select`` picks, the one that runs anywhere.
        self.kernel = "dequantize"
        #: Why ``kernel``, rather than a faster one, runs (for ``model.qcore_kernels`` and ``validate`` logs); empty
        #: when it is the fastest kernel there is for this device and dtype.
        self.reason = "no kernel selected yet"
        self._compute_dtype: torch.dtype | None = None

    # -- the public surface -------------------------------------------------------------------------------------

    def select(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        batch_hint: int = 1,
        kernel: str | None = None,
    ) -> str:
        """Pick the fastest kernel for activations of ``dtype`` on ``device``, repack the weight for it once (moving
        it to ``device``), and return the kernel's name.

        ``batch_hint`` is the number of rows ``matmul`` will mostly see (1 for decoding). ``kernel`` forces one
        kernel (benchmarks compare them on one shape); it raises ``ValueError`` where that kernel cannot run.
        Without it a kernel that refuses this shape, dtype or device falls back, never raises. On CPU, every
        :data:`_RELEASE_HEAP_AFTER` elements selected (one large weight, or several small ones) end with
        :func:`qcore.memory.release_heap`, so a backend that repacks weight after weight, in any order, needs no heap
        release of its own.
        """
        device = torch.device(device) if device is not None else self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        candidates = self._candidates(device, dtype, batch_hint)
        if kernel is not None:
            refusal = dict(candidates).get(kernel, f"{kernel!r} is not a kernel of {type(self).__name__}")
            if refusal is not None:
                raise ValueError(f"{type(self).__name__} {self.out_features}x{self.in_features}: {refusal}")
            chosen, reason = kernel, "requested"
        else:
            # Candidates come fastest first (measured), so the first one that can run is the choice.
            chosen = next(name for name, why in candidates if why is None)
            position = [name for name, _ in candidates].index(chosen)
            before = candidates[:position]
            slower = [name for name, why in candidates[position + 1 :] if why is None and name != "dequantize"]
            if before:
                reason = "; ".join(f"{name}: {why}" for name, why in before)
            elif chosen == "dequantize" and slower:
                reason = f"measured faster here than {', '.join(slower)} for {_name(dtype)}"
            else:
                reason = ""
        self._repack(chosen, device, dtype)
        if device.type == "cpu":
            # A repack's temporaries (int32 codes for the CPU int4 layout: 4 bytes a weight) would otherwise stay
            # in malloc's heap, fragmented between the packed weights: 300 MB over a 135M model's 210 Linears. Small
            # weights count together (14 MiB stayed behind SmolLM2's 60 k/v projections when each was too small).
            PackedWeight._unreleased += self.out_features * self.in_features
            if PackedWeight._unreleased >= _RELEASE_HEAP_AFTER:
                memory.release_heap()
                PackedWeight._unreleased = 0
        self.kernel, self.reason, self._compute_dtype = chosen, reason, dtype
        return chosen

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x`` of shape ``[..., in_features]``, with the kernel ``select`` chose.

        Differentiable in ``x`` and ``bias`` (adapters such as LoRA train through it): the backward pass multiplies
        by the dequantized weight; the weight itself is frozen.
        """
        if self.kernel == "dequantize" or x.dtype != self._compute_dtype or x.device != self.device:
            # A call in another dtype or on another device than selected for stays correct, just not fast.
            return F.linear(x, self.dequantize(x.dtype).to(x.device), bias)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _KernelMatmul.apply(x, bias, self)
        return self._forward(x, bias)

    def _forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = self._kernel_matmul(rows).reshape(*x.shape[:-1], self.out_features)
        return out + bias if bias is not None else out

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The exact float weight ``[out_features, in_features]``, computed in float32 and rounded once to ``dtype``."""

    @abc.abstractmethod
    def codes(self) -> torch.Tensor:
        """The integer (or float8) codes exactly as ``from_codes`` received them, in the plain ``[out, in]`` layout."""

    def row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """``codes()[rows]`` for a 1-D index tensor of output rows, without unpacking the rest.

        A tied embedding looks up a token's row of its output layer's weight this way. The kinds whose kernel keeps
        codes row by row (every kernel but CUDA's tinygemm) read only those rows; otherwise all codes are unpacked.
        """
        return self.codes()[rows.to(self.device)]

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds in memory (codes in their current layout, statistics, kernel copies of them)."""
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """An upper bound on ``|matmul(x) - x @ dequantize(x.dtype).T|`` for each output element (no bias).

        ``|x| @ E.T + (3u + 2K eps32) |x| @ |W|.T`` in float64: ``E`` is the per-weight error of what the selected
        kernel rounds (zero for ``dequantize``), ``u`` the unit roundoff of ``x.dtype`` (the reference rounds its
        weight and both round their result to it), and ``2K eps32`` the two float32 accumulations over
        ``K = in_features`` products. ``scaled_mm`` adds the rounding of the activations to fp8.
        """
        kernel = self.kernel if x.dtype == self._compute_dtype else "dequantize"
        weight = self.dequantize(torch.float64).abs()
        magnitude = x.abs().to(torch.float64).reshape(-1, self.in_features).to(weight.device)
        u = _unit_roundoff(x.dtype)
        eps32 = _unit_roundoff(torch.float32)
        bound = (3 * u + 2 * self.in_features * eps32) * (magnitude @ weight.T)
        if kernel != "dequantize":
            bound = bound + magnitude @ self._weight_error(kernel, x.dtype).T
        if kernel == "scaled_mm":
            bound = bound + self._activation_error(magnitude) @ weight.T
        return bound.reshape(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(out_features={self.out_features}, in_features={self.in_features}, "
            f"kernel={self.kernel!r})"
        )

    # -- what each kind provides --------------------------------------------------------------------------------

    @abc.abstractmethod
    def _candidates(self, device: torch.device, dtype: torch.dtype, batch_hint: int) -> list[tuple[str, str | None]]:
        """Kernels fastest first, each with why it cannot run here (``None`` when it can); ends with dequantize."""

    @abc.abstractmethod
    def _repack(self, kernel: str, device: torch.device, dtype: torch.dtype) -> None:
        """Lay the codes out as ``kernel`` reads them on ``device``, computing in ``dtype``."""

    @abc.abstractmethod
    def _kernel_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W.T`` through the selected kernel (``rows``: ``[n, in_features]``)."""

    @abc.abstractmethod
    def _weight_error(self, kernel: str, dtype: torch.dtype) -> torch.Tensor:
        """Per-weight bound on what ``kernel`` rounds of the exact weight, in float64 (for :meth:`error_bound`)."""

    @abc.abstractmethod
    def _tensors(self) -> list[torch.Tensor | None]:
        """Every tensor this weight holds (for :attr:`nbytes`)."""


class _KernelMatmul(torch.autograd.Function):
    """torch's packed kernels have no derivative: the gradient of ``x @ W.T`` is ``grad @ W``, with ``W``
    dequantized only when a backward pass runs."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return weight._forward(x, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.weight.dequantize(grad.dtype).to(grad.device) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, ctx.weight.out_features).sum(0)
        return grad_x, grad_bias, None


# ---------------------------------------------------------------------------------------------------------------
# int4 and group-wise int8 through torch's int4 kernels
# ---------------------------------------------------------------------------------------------------------------


class _Int4Halves:
    """One int4 operand of torch's int4 kernels: the packed codes and the ``[K/g, N, 2]`` scales-and-zeros."""

    def __init__(self, packed: torch.Tensor, scale_and_zeros: torch.Tensor, group_size: int, kernel: str):
        self.packed = packed
        self.scale_and_zeros = scale_and_zeros
        self.group_size = group_size
        self.kernel = kernel

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack-cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.contiguous(), self.packed, self.group_size, self.scale_and_zeros
            )
        return torch.ops.aten._weight_int4pack_mm(rows.contiguous(), self.packed, self.group_size, self.scale_and_zeros)

    def codes(self, out_features: int, in_features: int) -> torch.Tensor:
        """The codes 0..15 as uint8 ``[N, K]``, exactly."""
        if self.kernel == "int4pack-cpu":
            return _unpack_int4_cpu(self.packed, out_features, in_features, _cpu_int4_layout())
        return _unpack_int4_by_identity(self.packed, out_features, in_features, self.kernel)

    def row_codes(self, rows: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
        """``codes(out_features, in_features)[rows]``: gathered from the CPU layout, unpacked whole otherwise."""
        if self.kernel == "int4pack-cpu":
            return _int4_cpu_rows(self.packed, rows, out_features, in_features, _cpu_int4_layout())
        return self.codes(out_features, in_features)[rows]

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scale_and_zeros]


def _int4_refusal(
    device: torch.device, dtype: torch.dtype, out_features: int, in_features: int, group_size: int
) -> tuple[str, str | None]:
    """The int4 kernel for ``device`` and why it cannot take this weight (``None`` when it can)."""
    kernel = "tinygemm-cuda" if device.type == "cuda" else "int4pack-cpu"
    if device.type not in ("cpu", "cuda"):
        return kernel, f"no int4 kernel for {device.type}"
    kernel_group = _kernel_group(group_size)
    if kernel_group is None:
        return kernel, f"group size {group_size} is not a multiple of 32 (the kernels take groups of 32..256)"
    if device.type == "cpu":
        if out_features % _CPU_INT4_ROWS:
            return kernel, f"out_features {out_features} is not a multiple of {_CPU_INT4_ROWS}"
        if _cpu_int4_layout() is None:
            return kernel, "torch's CPU int4 layout on this machine is not one qcore can unpack exactly"
    else:
        if out_features % _CUDA_INT4_ROWS or _inner_k_tiles(in_features) is None:
            return (
                kernel,
                f"tinygemm needs out_features % 8 == 0 and in_features % 32 == 0, got {out_features}x{in_features}",
            )
    if not _int4_runs(device, dtype):
        return (
            kernel,
            f"torch {torch.__version__} has no {KERNELS[kernel]} for {_name(dtype)} on {_describe_device(device)}",
        )
    return kernel, None


def _int4_is_slow(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's CPU int4 kernel is vectorized for bfloat16 only: in float16/float32 it runs a scalar loop, measured
    20x (batch 1) to 100x (batch 32) slower than dequantizing (it still runs, and is tested, when asked for)."""
    return device.type == "cpu" and dtype != torch.bfloat16


def _pack_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_term: torch.Tensor,
    group_size: int,
    kernel: str,
    dtype: torch.dtype,
    nibbles: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> _Int4Halves:
    """Pack uint8 codes 0..15 ``[N, K]`` for ``kernel`` with per-group ``scale`` and kernel zeros ``z'`` (float32).

    ``nibbles``, when given, turns a slice of rows of ``codes`` into those codes (one half of an int8 weight), so
    the full-size intermediate is never made.
    """
    nibbles = nibbles or (lambda rows: rows)
    kernel_group = _kernel_group(group_size)
    repeat = group_size // kernel_group
    # A group larger than 256 (per-channel included) is several kernel groups sharing one scale.
    scale_and_zeros = torch.stack(
        (scale.repeat_interleave(repeat, dim=1), zero_term.repeat_interleave(repeat, dim=1)), dim=-1
    )
    scale_and_zeros = scale_and_zeros.to(dtype).transpose(0, 1).contiguous()
    if kernel == "int4pack-cpu":
        # The CPU layout stores blocks of 64 rows one after another, so packing whole blocks a slice at a time gives
        # the same bytes while the kernel's int32 input (4 bytes a weight) stays a few MiB for any weight.
        width = nibbles(codes[:1]).shape[1]  # K: ``nibbles`` may widen what it is given
        step = max(64, _PACK_ROWS_ELEMENTS // max(1, width) // 64 * 64)
        packed = torch.empty(codes.shape[0], width // 2, dtype=torch.uint8, device=codes.device)
        for start in range(0, codes.shape[0], step):
            rows = nibbles(codes[start : start + step]).to(torch.int32)
            packed[start : start + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
    else:
        codes = nibbles(codes)
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(codes.shape[1]))
    return _Int4Halves(packed, scale_and_zeros, kernel_group, kernel)


def _kernel_group(group_size: int) -> int | None:
    """The largest group size the int4 kernels take that divides ``group_size``."""
    return next((g for g in _INT4_GROUPS if group_size % g == 0), None)


def _inner_k_tiles(in_features: int) -> int | None:
    return next((tiles for tiles in (8, 4, 2) if in_features % (tiles * 16) == 0), None)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[N, K]`` (K even) stored two per byte, the even column in the low nibble; made a slice of rows
    at a time, so the temporaries stay a few MiB beside the codes of a large weight."""
    packed = torch.empty(codes.shape[0], codes.shape[1] // 2, dtype=torch.uint8, device=codes.device)
    step = max(1, _PACK_ROWS_ELEMENTS // max(1, codes.shape[1]))
    for start in range(0, codes.shape[0], step):
        part = codes[start : start + step].to(torch.uint8)
        torch.bitwise_or(part[:, ::2], part[:, 1::2] << 4, out=packed[start : start + step])
    return packed


def _from_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _unpack_int4_cpu(packed: torch.Tensor, out_features: int, in_features: int, layout: str) -> torch.Tensor:
    """The exact inverse of ``_convert_weight_to_int4pack_for_cpu`` (aten/src/ATen/native/cpu/int4mm_kernel.cpp).

    Output rows are packed in blocks of ``block`` rows (64 with AVX-512, 32 otherwise), each block stored as
    ``[K, block / 2]`` bytes. A full AVX-512 block pairs row ``r`` with row ``r + 32`` (low, high nibble) and an
    AVX2 block row ``r`` with ``r + 16``; every other block (the portable build, and the last block when
    ``out_features`` is not a multiple of the block) pairs neighbouring rows.
    """
    block = 64 if layout == "avx512" else 32
    flat = packed.reshape(-1)
    full = out_features // block
    parts = []
    if full:
        pairs = flat[: full * in_features * block // 2].view(full, in_features, block // 2)
        low, high = pairs & 15, pairs >> 4
        if layout == "pairs":
            rows = torch.stack((low, high), dim=-1).reshape(full, in_features, block)
        else:
            rows = torch.cat((low, high), dim=-1)
        parts.append(rows.transpose(1, 2).reshape(full * block, in_features))
    tail = out_features - full * block
    if tail:
        pairs = flat[full * in_features * block // 2 :].view(in_features, tail // 2)
        parts.append(torch.stack((pairs & 15, pairs >> 4), dim=-1).reshape(in_features, tail).T)
    return torch.cat(parts).contiguous()


def _int4_cpu_rows(packed: torch.Tensor, rows: torch.Tensor, out_features: int, in_features: int, layout: str):
    """``_unpack_int4_cpu(packed, ...)[rows]`` reading only those rows' bytes: for each row, its block, the byte
    column it shares with its partner row, and which nibble is its own (the layouts ``_unpack_int4_cpu`` inverts)."""
    block = 64 if layout == "avx512" else 32
    flat, rows = packed.reshape(-1), rows.reshape(-1).to(packed.device)
    full = out_features // block
    k = torch.arange(in_features, device=packed.device)
    position = rows % block
    if layout == "pairs":
        column, high = position // 2, position % 2 == 1
    else:
        column, high = position % (block // 2), position >= block // 2
    in_block = (rows // block * in_features * (block // 2))[:, None] + k * (block // 2) + column[:, None]
    # The last, partial block (out_features not a multiple of ``block``) always pairs neighbouring rows.
    tail_row, tail_pairs = rows - full * block, max(1, (out_features - full * block) // 2)
    in_tail = full * in_features * block // 2 + k * tail_pairs + (tail_row // 2)[:, None]
    is_tail = tail_row >= 0
    index = torch.where(is_tail[:, None], in_tail, in_block)
    high = torch.where(is_tail, tail_row % 2 == 1, high)
    values = flat[index]
    return torch.where(high[:, None], values >> 4, values & 15)


def _unpack_int4_by_identity(packed: torch.Tensor, out_features: int, in_features: int, kernel: str) -> torch.Tensor:
    """Codes read back through the kernel itself: with scale 1 and zero 8 it computes ``x @ q.T``, and ``x`` the
    identity gives ``q`` exactly (integers 0..15 are exact in bfloat16, one product per output)."""
    group = _kernel_group(in_features) or 32
    ones = torch.ones(in_features // group, out_features, 1, dtype=torch.bfloat16, device=packed.device)
    scale_and_zeros = torch.cat((ones, ones * 8), dim=-1)
    halves = _Int4Halves(packed, scale_and_zeros, group, kernel)
    columns = []
    for start in range(0, in_features, _IDENTITY_CHUNK):
        stop = min(start + _IDENTITY_CHUNK, in_features)
        eye = torch.zeros(stop - start, in_features, dtype=torch.bfloat16, device=packed.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=torch.bfloat16, device=packed.device)
        columns.append(halves.matmul(eye).round().to(torch.uint8))
    return torch.cat(columns).T.contiguous()


@functools.cache
def _cpu_int4_layout() -> str | None:
    """Which of torch's CPU int4 layouts this process uses, verified by packing and unpacking a probe (rows 112 =
    one full block of 64 and a 48-row tail), or ``None`` when none of the known inverses reproduces it."""
    capability = torch.backends.cpu.get_cpu_capability()
    layout = {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "pairs")
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (112, 64), dtype=torch.int32, generator=generator)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except (RuntimeError, NotImplementedError):
        return None
    if torch.equal(_unpack_int4_cpu(packed, 112, 64, layout), probe.to(torch.uint8)):
        return layout
    return None


@functools.cache
def _int4_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build runs the int4 kernel for ``dtype`` activations on ``device`` (a tiny probe)."""
    kernel = "tinygemm-cuda" if device.type == "cuda" else "int4pack-cpu"
    try:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return False
        codes = torch.zeros(16, 64, dtype=torch.uint8, device=device)
        halves = _pack_int4(
            codes,
            torch.ones(16, 2, device=device),
            torch.zeros(16, 2, device=device),
            32,
            kernel,
            dtype,
        )
        halves.matmul(torch.ones(1, 64, dtype=dtype, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


class Int4Weight(PackedWeight):
    """Group-wise affine int4: ``W[o, i] = (q[o, i] - zero[o, i // g]) * scale[o, i // g]``, codes 0..15.

    Until ``select`` chooses a kernel the codes are held two per byte (4 bits a weight). The int4 kernels keep them
    in their own layout instead (never both) plus the ``[K/g, N, 2]`` scales-and-zeros in the activation dtype.
    """

    kind = "int4"

    def __init__(self, nibbles, scale, zero, group_size, out_features, in_features):
        super().__init__(out_features, in_features)
        self._nibbles: torch.Tensor | None = nibbles
        self._halves: _Int4Halves | None = None
        self.scale = scale
        self.zero = zero
        self.group_size = group_size

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, group_size: int | None = None
    ) -> Int4Weight:
        """An int4 weight from unsigned codes ``[out, in]`` (0..15, any integer dtype), float ``scale`` and ``zero``
        (``[out, in // g]``; ``zero`` in code units, may be fractional; ``None`` means 8) and ``group_size`` ``g``
        (``None`` or ``in`` means per output channel).

        :raises ValueError: shapes that do not fit, codes outside 0..15, an odd ``in`` or a ``g`` that does not
            divide it. A backend validates checkpoint data first and raises ``CheckpointError`` itself.
        """
        out_features, in_features = _check_codes(codes, "Int4Weight")
        group_size = in_features if group_size is None else group_size
        _check_groups(scale, zero, out_features, in_features, group_size, "Int4Weight")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"Int4Weight codes must be an integer tensor, got {codes.dtype}")
        if in_features % 2:
            raise ValueError(f"Int4Weight needs an even in_features to hold two codes a byte, got {in_features}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
            raise ValueError(f"Int4Weight codes must lie in 0..15, got {int(codes.min())}..{int(codes.max())}")
        return cls.from_two_per_byte(_nibbles(codes), scale, zero, group_size)

    @classmethod
    def from_two_per_byte(
        cls, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, group_size: int | None = None
    ) -> Int4Weight:
        """:meth:`from_codes` for codes already held two a byte, uint8 ``[out, in // 2]`` with column ``2i`` in the
        low nibble of byte ``i`` (the form the weight keeps until ``select``): no byte-per-code copy is made, which
        for a large weight (a vocabulary-sized head) is most of a load's peak.

        :raises ValueError: as :meth:`from_codes` (every nibble is a code 0..15).
        """
        if nibbles.dtype != torch.uint8:
            raise ValueError(f"Int4Weight two-a-byte codes must be uint8, got {nibbles.dtype}")
        out_features, half = _check_codes(nibbles, "Int4Weight")
        in_features = 2 * half
        group_size = in_features if group_size is None else group_size
        groups = _check_groups(scale, zero, out_features, in_features, group_size, "Int4Weight")
        return cls(
            nibbles,
            scale.reshape(out_features, groups),
            None if zero is None else zero.reshape(out_features, groups),
            group_size,
            out_features,
            in_features,
        )

    def codes(self) -> torch.Tensor:
        if self._halves is not None:
            return self._halves.codes(self.out_features, self.in_features)
        return _from_nibbles(self._nibbles)

    def row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.device)
        if self._halves is not None:
            return self._halves.row_codes(rows, self.out_features, self.in_features)
        return _from_nibbles(self._nibbles[rows])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _affine(self.codes(), self.scale, self.zero, 8, self.group_size, dtype)

    def _candidates(self, device, dtype, batch_hint):
        int4 = _int4_refusal(device, dtype, self.out_features, self.in_features, self.group_size)
        return [("dequantize", None), int4] if _int4_is_slow(device, dtype) else [int4, ("dequantize", None)]

    def _repack(self, kernel, device, dtype):
        self.scale = self.scale.to(device)
        self.zero = None if self.zero is None else self.zero.to(device)
        # Two codes a byte, as held before any kernel: packed from that form, a slice of rows at a time (a full
        # uint8 copy of the codes is twice the weight); from a kernel's layout, unpacked first.
        nibbles = self._nibbles.to(device) if self._nibbles is not None else None
        if kernel == "dequantize":
            self._nibbles = nibbles if nibbles is not None else _nibbles(self.codes().to(device))
            self._halves = None
            return
        source, unpack = (nibbles, _from_nibbles) if nibbles is not None else (self.codes().to(device), None)
        scale = self.scale.to(torch.float32)
        zero_term = (8 - self.zero.to(torch.float32)) * scale if self.zero is not None else torch.zeros_like(scale)
        self._nibbles = None
        self._halves = _pack_int4(source, scale, zero_term, self.group_size, kernel, dtype, nibbles=unpack)

    def _kernel_matmul(self, rows):
        return self._halves.matmul(rows)

    def _weight_error(self, kernel, dtype):
        # (q - 8) * round(s) + round(z') against round((q - zero) * s): |q - 8| <= 8.
        u = _unit_roundoff(dtype)
        scale = _expand(self.scale.to(torch.float64).abs(), self.group_size)
        if self.zero is None:
            return u * 8 * scale * (1 + u)
        zero = _expand(self.zero.to(torch.float64), self.group_size)
        return u * (8 + (8 - zero).abs()) * scale * (1 + u)

    def _tensors(self):
        held = [self._nibbles, self.scale, self.zero]
        return held + (self._halves.tensors() if self._halves is not None else [])


# ---------------------------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------------------------


class Int8Weight(PackedWeight):
    """int8 ``W = (q - zero) * scale`` per output row (``group_size`` ``None``) or group-wise along ``in``.

    Symmetric per-row weights run ``torch._weight_int8pack_mm``. Group-wise (or zero-point) weights run torch's int4
    kernel twice: with ``u = q + 128`` split into nibbles ``u = 16 h + l``,
    ``W = (h - 8) * 16 s + (l - 8) * s + (8 - zero) * s``: two 4-bit halves, the same bytes as the int8 codes.
    """

    kind = "int8"

    def __init__(self, codes, scale, zero, group_size, out_features, in_features):
        super().__init__(out_features, in_features)
        self._codes: torch.Tensor | None = codes
        self._halves: tuple[_Int4Halves, _Int4Halves] | None = None
        self._kernel_scale: torch.Tensor | None = None
        self.scale = scale
        self.zero = zero
        self.group_size = group_size

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, group_size: int | None = None
    ) -> Int8Weight:
        """An int8 weight from ``codes`` (int8 ``[out, in]``), float ``scale`` (``[out]`` or ``[out, 1]`` per row,
        ``[out, in // g]`` group-wise) and optional ``zero`` of the same shape (code units; ``None`` means 0).

        :raises ValueError: a dtype or shape that does not fit.
        """
        out_features, in_features = _check_codes(codes, "Int8Weight")
        if codes.dtype != torch.int8:
            raise ValueError(f"Int8Weight codes must be int8, got {codes.dtype}")
        per_row = group_size is None or group_size == in_features
        group_size = in_features if per_row else group_size
        groups = _check_groups(scale, zero, out_features, in_features, group_size, "Int8Weight")
        return cls(
            codes,
            scale.reshape(out_features, groups),
            None if zero is None else zero.reshape(out_features, groups),
            None if per_row else group_size,
            out_features,
            in_features,
        )

    @property
    def _group(self) -> int:
        return self.group_size or self.in_features

    def codes(self) -> torch.Tensor:
        if self._halves is not None:
            high, low = (half.codes(self.out_features, self.in_features) for half in self._halves)
            return _from_halves(high, low)
        return self._codes

    def row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.device)
        if self._halves is not None:
            high, low = (half.row_codes(rows, self.out_features, self.in_features) for half in self._halves)
            return _from_halves(high, low)
        return self._codes[rows]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _affine(self.codes(), self.scale, self.zero, 0, self._group, dtype)

    def _candidates(self, device, dtype, batch_hint):
        int8pack = "int8pack", _int8pack_refusal(self, device, dtype)
        int4 = _int4_refusal(device, dtype, self.out_features, self.in_features, self._group)
        if _int4_is_slow(device, dtype):
            # Both CPU kernels are vectorized for bfloat16 only; measured slower than dequantizing otherwise.
            return [("dequantize", None), int8pack, int4]
        if device.type == "cpu" and (batch_hint <= _CPU_INT8_HALVES_MAX_BATCH or int8pack[1] is not None):
            # Measured on CPU: at decode batch sizes two int4 halves (the same bytes as int8) beat
            # _weight_int8pack_mm; from batch 4 on, int8pack wins.
            return [int4, int8pack, ("dequantize", None)]
        return [int8pack, int4, ("dequantize", None)]

    def _repack(self, kernel, device, dtype):
        codes = self.codes().to(device)
        self.scale = self.scale.to(device)
        self.zero = None if self.zero is None else self.zero.to(device)
        self._halves = self._kernel_scale = None
        if kernel in ("int4pack-cpu", "tinygemm-cuda"):
            unsigned = codes.view(torch.uint8)  # q + 128 is this byte with its top bit flipped
            scale = self.scale.to(torch.float32)
            zero = self.zero.to(torch.float32) if self.zero is not None else torch.zeros_like(scale)
            self._codes = None
            self._halves = (
                _pack_int4(unsigned, scale * 16, torch.zeros_like(scale), self._group, kernel, dtype,
                           nibbles=lambda rows: (rows ^ 0x80) >> 4),
                _pack_int4(unsigned, scale, (8 - zero) * scale, self._group, kernel, dtype,
                           nibbles=lambda rows: rows & 15),
            )  # fmt: skip
            return
        if kernel == "int8pack" and device.type == "cpu" and _misaligned(codes):
            codes = codes.clone()
        self._codes = codes
        if kernel == "int8pack":
            self._kernel_scale = self.scale.reshape(-1).to(dtype)

    def _kernel_matmul(self, rows):
        if self._halves is not None:
            return self._halves[0].matmul(rows) + self._halves[1].matmul(rows)
        if not rows.is_contiguous() or (rows.device.type == "cpu" and _misaligned(rows)):
            rows = rows.clone(memory_format=torch.contiguous_format)
        # Some CUDA builds return float32 whatever the activation dtype.
        return torch._weight_int8pack_mm(rows, self._codes, self._kernel_scale).to(rows.dtype)

    def _weight_error(self, kernel, dtype):
        u = _unit_roundoff(dtype)
        scale = _expand(self.scale.to(torch.float64).abs(), self._group)
        codes = self.codes().to(torch.float64)
        if kernel == "int8pack":
            return u * codes.abs() * scale * (1 + u)
        # (h - 8) * round(16 s) + (l - 8) * round(s) + round((8 - zero) s) with |h - 8|, |l - 8| <= 8; the two halves'
        # results are rounded to the activation dtype before they are added, and each bounded by the same terms.
        zero = torch.zeros_like(scale) if self.zero is None else _expand(self.zero.to(torch.float64), self._group)
        halves = (8 * 16 + 8 + (8 - zero).abs()) * scale
        return (2 * u + 2 * self.in_features * _unit_roundoff(torch.float32)) * halves * (1 + u)

    def _tensors(self):
        held = [self._codes, self.scale, self.zero, self._kernel_scale]
        for half in self._halves or ():
            held += half.tensors()
        return held


def _from_halves(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """int8 codes from the nibbles of ``q + 128`` (``16 * high + low``), as two int4 halves hold them."""
    return (high.to(torch.int16) * 16 + low.to(torch.int16) - 128).to(torch.int8)


def _int8pack_refusal(weight: Int8Weight, device: torch.device, dtype: torch.dtype) -> str | None:
    if weight.group_size is not None:
        return f"torch._weight_int8pack_mm takes one scale per row, this weight has groups of {weight.group_size}"
    if weight.zero is not None:
        return "torch._weight_int8pack_mm is symmetric, this weight has zero points"
    if device.type == "cpu" and weight.in_features % _CPU_INT8_K_STEP:
        return f"torch's CPU int8 kernel needs in_features divisible by {_CPU_INT8_K_STEP}"
    if not _int8pack_runs(device, dtype):
        return f"torch {torch.__version__} has no torch._weight_int8pack_mm for {_name(dtype)} on {device.type}"
    return None


@functools.cache
def _int8pack_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build has ``_weight_int8pack_mm`` for ``device`` (older CUDA builds, MPS, XPU vary)."""
    try:
        torch._weight_int8pack_mm(
            torch.zeros(1, 16, dtype=dtype, device=device),
            torch.zeros(8, 16, dtype=torch.int8, device=device),
            torch.ones(8, dtype=dtype, device=device),
        )
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _misaligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % _CPU_ALIGNMENT != 0


# ---------------------------------------------------------------------------------------------------------------
# float8
# ---------------------------------------------------------------------------------------------------------------

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: ``scaled_mm`` quantizes activations to e4m3 (more precision than e5m2; torch pairs it with either weight format).
_FP8_ACTIVATIONS = torch.float8_e4m3fn


class Fp8Weight(PackedWeight):
    """float8 codes times a dequantization scale (``weight_scale_inv``): one per tensor (``[]``/``[1]``), one per
    output row (``[out]``/``[out, 1]``), or one per ``block_size`` block (``[ceil(out / b0), ceil(in / b1)]``)."""

    kind = "fp8"

    def __init__(self, codes, scale, block_size, out_features, in_features):
        super().__init__(out_features, in_features)
        self._codes = codes
        self.scale = scale
        self.zero = None
        self.block_size = block_size
        self._kernel_scale: torch.Tensor | None = None

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None = None
    ) -> Fp8Weight:
        """An fp8 weight from ``codes`` (``float8_e4m3fn`` or ``float8_e5m2`` ``[out, in]``) and its float ``scale``.

        :raises ValueError: a dtype, or a scale shape that is neither per-tensor, per-row nor the block grid.
        """
        out_features, in_features = _check_codes(codes, "Fp8Weight")
        if codes.dtype not in _FP8_DTYPES:
            raise ValueError(f"Fp8Weight codes must be float8_e4m3fn or float8_e5m2, got {codes.dtype}")
        if not scale.is_floating_point():
            raise ValueError(f"Fp8Weight scale must be a float tensor, got {scale.dtype}")
        if block_size is not None:
            rows, cols = (math.ceil(out_features / block_size[0]), math.ceil(in_features / block_size[1]))
            if tuple(scale.shape) != (rows, cols):
                raise ValueError(
                    f"Fp8Weight scale for blocks {tuple(block_size)} of a {out_features}x{in_features} weight must be "
                    f"[{rows}, {cols}], got {list(scale.shape)}"
                )
            return cls(codes, scale, tuple(block_size), out_features, in_features)
        if scale.numel() == 1:
            return cls(codes, scale.reshape(()), None, out_features, in_features)
        if scale.numel() == out_features and scale.dim() <= 2 and scale.shape[0] == out_features:
            return cls(codes, scale.reshape(out_features, 1), None, out_features, in_features)
        raise ValueError(
            f"Fp8Weight scale of shape {list(scale.shape)} is neither per-tensor ([] or [1]), per-row "
            f"([{out_features}] or [{out_features}, 1]) nor blocked (pass block_size)"
        )

    def _activation_error(self, magnitude: torch.Tensor) -> torch.Tensor:
        """How far ``scaled_mm``'s fp8 activations (scaled to the row's, or the tensor's, largest value) can lie from
        ``|x|``: relative rounding of normal numbers, and half a subnormal step times the scale below them."""
        finfo = torch.finfo(_FP8_ACTIVATIONS)
        amax = magnitude.amax() if self._kernel_scale.dim() == 0 else magnitude.amax(dim=-1, keepdim=True)
        half_step = finfo.smallest_normal * finfo.eps / 2 * amax / finfo.max
        return _unit_roundoff(_FP8_ACTIVATIONS) * magnitude + half_step

    def codes(self) -> torch.Tensor:
        return self._codes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scale.to(torch.float32)
        if self.block_size is not None:
            rows, cols = self.block_size
            scale = scale.repeat_interleave(rows, 0)[: self.out_features].repeat_interleave(cols, 1)
            scale = scale[:, : self.in_features]
        return (self._codes.to(torch.float32) * scale).to(dtype)

    def _candidates(self, device, dtype, batch_hint):
        scaled_mm = ("scaled_mm", self._scaled_mm_refusal(device, dtype))
        if device.type == "cpu":
            # Measured: torch's CPU _scaled_mm is slower than dequantizing and torch's matmul (benchmarks/README.md).
            return [("dequantize", None), scaled_mm]
        return [scaled_mm, ("dequantize", None)]

    def _scaled_mm_refusal(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if self.block_size is not None:
            return "block scales; torch._scaled_mm takes per-tensor or per-row scales"
        if device.type == "cpu":
            return None if dtype in (torch.bfloat16, torch.float16, torch.float32) else f"no CPU fp8 matmul for {dtype}"
        if device.type != "cuda":
            return f"no fp8 matmul for {device.type}"
        if torch.cuda.get_device_capability(device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(device)
            return f"fp8 matmul needs sm89 or newer, this GPU is sm{major}{minor}"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"torch._scaled_mm writes bfloat16/float16, not {_name(dtype)}"
        if self.scale.dim() and dtype != torch.bfloat16:
            return f"torch._scaled_mm with row-wise scales writes bfloat16 only, not {_name(dtype)}"
        if self.in_features % 16 or self.out_features % 16:
            return f"torch._scaled_mm needs both dimensions divisible by 16, got {self.out_features}x{self.in_features}"
        return None

    def _repack(self, kernel, device, dtype):
        self._codes = self._codes.to(device)
        self.scale = self.scale.to(device)
        self._kernel_scale = None
        if kernel == "scaled_mm":
            scale = self.scale.to(torch.float32)
            # torch._scaled_mm takes a tensor-wise scale as a scalar, a row-wise one as [1, N].
            self._kernel_scale = scale.reshape(()) if scale.dim() == 0 else scale.reshape(1, -1).contiguous()

    def _kernel_matmul(self, rows):
        finfo = torch.finfo(_FP8_ACTIVATIONS)
        if self._kernel_scale.dim() == 0:
            amax = rows.abs().amax().to(torch.float32)
        else:
            amax = rows.abs().amax(dim=-1, keepdim=True).to(torch.float32)
        scale_a = (amax / finfo.max).clamp(min=torch.finfo(torch.float32).tiny)
        quantized = (rows.to(torch.float32) / scale_a).clamp(finfo.min, finfo.max).to(_FP8_ACTIVATIONS)
        return torch._scaled_mm(
            quantized, self._codes.T, scale_a=scale_a, scale_b=self._kernel_scale, out_dtype=rows.dtype
        )

    def _weight_error(self, kernel, dtype):
        # The kernel multiplies in float32 with the exact float32 scale: the weight itself is not rounded.
        return torch.zeros(self.out_features, self.in_features, dtype=torch.float64, device=self.device)

    def _tensors(self):
        return [self._codes, self.scale, self._kernel_scale]


# ---------------------------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------------------------


class PackedLinear(nn.Module):
    """A ``Linear``-shaped module over a :class:`PackedWeight`: ``forward`` is one ``weight.matmul(x, bias)``.

    Its ``state_dict`` holds the weight's exact stored form, ``weight_codes``, ``weight_scale`` and (when present)
    ``weight_zero``, plus ``bias``; ``load_state_dict`` rebuilds the weight from those. Backends with a format of their
    own subclass it and override ``_save_to_state_dict``/``_load_from_state_dict``.
    """

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def select(self, device=None, dtype: torch.dtype = torch.bfloat16, batch_hint: int = 1) -> str:
        """Choose and prepare the weight's kernel (:meth:`PackedWeight.select`), moving the bias along with it."""
        kernel = self.weight.select(device, dtype, batch_hint)
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.to(device=self.weight.device, dtype=dtype), requires_grad=False)
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.matmul(x, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_codes"] = self.weight.codes()
        destination[prefix + "weight_scale"] = self.weight.scale
        if self.weight.zero is not None:
            destination[prefix + "weight_zero"] = self.weight.zero

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = {name: prefix + name for name in ("weight_codes", "weight_scale", "weight_zero")}
        if names["weight_codes"] not in state_dict or names["weight_scale"] not in state_dict:
            missing_keys.extend(names[n] for n in ("weight_codes", "weight_scale") if names[n] not in state_dict)
        else:
            codes, scale = state_dict[names["weight_codes"]], state_dict[names["weight_scale"]]
            zero = state_dict.get(names["weight_zero"])
            old = self.weight
            try:
                if isinstance(old, Fp8Weight):
                    weight = Fp8Weight.from_codes(codes, scale, old.block_size)
                else:
                    weight = type(old).from_codes(codes, scale, zero, old.group_size)
            except ValueError as error:
                error_msgs.append(f"{prefix}weight: {error}")
            else:
                if old.kernel != "dequantize" or old._compute_dtype is not None:
                    weight.select(old.device, old._compute_dtype or torch.bfloat16)
                self.weight = weight
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k not in names.values()},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight.kind}, kernel={self.weight.kernel}"
        )


def describe(weights) -> str:
    """One line for ``context.report_kernel``: each kernel that runs, with its op and how many weights use it."""
    counts: dict[str, int] = {}
    for weight in weights:
        counts[weight.kernel] = counts.get(weight.kernel, 0) + 1
    if len(counts) == 1:
        return KERNELS[next(iter(counts))]
    return "; ".join(f"{KERNELS[kernel]} for {count} modules" for kernel, count in sorted(counts.items()))


# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_codes(codes: torch.Tensor, kind: str) -> tuple[int, int]:
    if codes.dim() != 2:
        raise ValueError(f"{kind} codes must be [out_features, in_features], got shape {list(codes.shape)}")
    return int(codes.shape[0]), int(codes.shape[1])


def _check_groups(scale, zero, out_features: int, in_features: int, group_size: int, kind: str) -> int:
    """The number of groups per row, after checking ``scale`` and ``zero`` hold one value per group."""
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{kind} group_size {group_size} does not divide in_features {in_features}")
    groups = in_features // group_size
    for name, tensor in (("scale", scale), ("zero", zero)):
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{kind} {name} must be a float tensor, got {tensor.dtype}")
        if tensor.numel() != out_features * groups or tensor.shape[0] != out_features:
            raise ValueError(
                f"{kind} {name} must hold one value per output row and group, [{out_features}, {groups}] for groups of "
                f"{group_size}; got {list(tensor.shape)}"
            )
    return groups


def _expand(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=1)


def _affine(codes, scale, zero, default_zero: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, in float32 (float64 when asked for), rounded once to ``dtype``."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rows, cols = codes.shape
    grouped = codes.to(compute).reshape(rows, cols // group_size, group_size)
    shift = grouped - (zero.to(compute).unsqueeze(-1) if zero is not None else default_zero)
    return (shift * scale.to(compute).unsqueeze(-1)).reshape(rows, cols).to(dtype)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} (sm{major}{minor})"
    return device.type
