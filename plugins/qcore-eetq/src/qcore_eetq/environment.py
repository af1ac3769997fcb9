"""Which int8 matmul can run here: the account ``validate`` (phase 1) logs and the choice ``optimize_runtime``
(phase 6) makes for each module.

Two families, fastest first:

* ``eetq``: the eetq package's CUDA w8a16 GEMM (``EETQ.w8_a16_gemm``), for float16 activations on a GPU whose
  architecture eetq's weight layout transform supports (sm70 to sm89), in/out features multiples of 64.
* otherwise qcore's kernel layer (:mod:`qcore.kernels`) picks for the module's shape, device and dtype: on CPU in
  bfloat16 torch's int4 kernel run on the int8 codes as two 4-bit halves (the same bytes, faster than
  ``torch._weight_int8pack_mm`` at decode batch sizes), ``torch._weight_int8pack_mm`` on CUDA, and
  dequantize + matmul where a kernel refuses (CPU float16/float32, shapes a kernel cannot take).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter
from collections.abc import Iterable
from types import ModuleType

import torch
from qcore.kernels import KERNELS

__all__ = ["KERNEL_NAMES", "KernelChoice", "eetq_kernels", "choose_kernel", "describe", "summarize"]

#: ``torch`` means: the kernel layer chooses (the module records the kernel it chose).
KERNEL_NAMES = {
    "eetq": "eetq w8_a16_gemm",
    "torch": "qcore.kernels int8",
    **KERNELS,
    "int4pack-cpu": f"{KERNELS['int4pack-cpu']} on two 4-bit halves",
    "tinygemm-cuda": f"{KERNELS['tinygemm-cuda']} on two 4-bit halves",
}

#: GPU architectures (compute capability) whose layout eetq's preprocess_weights knows.
_EETQ_ARCHS = ((7, 0), (9, 0))
#: eetq's GEMM tiles the weight in blocks of 64 along both dimensions.
_EETQ_TILE = 64


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """A kernel (a key of :data:`KERNEL_NAMES`) and why it, rather than a faster one, runs."""

    kernel: str
    reason: str

    def __str__(self) -> str:
        return f"{KERNEL_NAMES[self.kernel]} ({self.reason})"


def eetq_kernels() -> ModuleType | None:
    """The eetq package's compiled CUDA extension (``import EETQ``), or ``None`` when it does not import."""
    try:
        module = importlib.import_module("EETQ")
    except (ImportError, OSError):  # OSError: built against another torch/CUDA, a shared library fails to load
        return None
    return module if hasattr(module, "w8_a16_gemm") and hasattr(module, "preprocess_weights") else None


def choose_kernel(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> KernelChoice:
    """``eetq`` where the eetq package runs this ``Linear(in_features, out_features)``; otherwise ``torch`` (the
    kernel layer then picks), with the reason eetq does not run."""
    choice = _kernel_for(device, dtype)
    if choice.kernel == "eetq" and (in_features % _EETQ_TILE or out_features % _EETQ_TILE):
        return KernelChoice("torch", f"eetq needs in/out features divisible by {_EETQ_TILE}")
    return choice


def describe(device_types: Iterable[str], dtype: torch.dtype) -> str:
    """What is available here and the kernel each device type will use, in one line for ``validate`` to log."""
    eetq = "installed" if eetq_kernels() is not None else "not installed"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cuda = f"available (sm{major}{minor})"
    else:
        cuda = f"not available (torch {torch.__version__})"
    kernels = "; ".join(f"{kind}: {_kernel_for(torch.device(kind), dtype)}" for kind in sorted(set(device_types)))
    return f"eetq package {eetq}, CUDA {cuda}; {_dtype_label(dtype)} activations -> {kernels}"


def summarize(choices: Iterable[KernelChoice]) -> str:
    """One line for ``context.report_kernel``: the kernel of most modules, and any others with their counts."""
    counts = Counter(choices).most_common()
    if len(counts) == 1:
        return str(counts[0][0])
    return "; ".join(f"{choice} for {count} modules" for choice, count in counts)


def _dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kernel_for(device: torch.device, dtype: torch.dtype) -> KernelChoice:
    eetq = eetq_kernels()
    if eetq is None:
        missing = "eetq package not installed"
    elif device.type != "cuda":
        missing = "eetq package installed, but it runs on CUDA only"
    elif dtype != torch.float16:
        missing = f"eetq needs float16 activations, the model runs in {_dtype_label(dtype)}"
    elif not _EETQ_ARCHS[0] <= torch.cuda.get_device_capability(device) < _EETQ_ARCHS[1]:
        major, minor = torch.cuda.get_device_capability(device)
        missing = f"eetq's weight layout supports sm70 to sm89, this GPU is sm{major}{minor}"
    else:
        return KernelChoice("eetq", "eetq package, CUDA, float16")
    return KernelChoice("torch", missing)
