"""``EetqLinear``, the module that replaces each owned ``nn.Linear``/``Conv1D``: made empty on meta in phase 3,
filled in phase 4, given its kernel in phase 6, and saved by its ``state_dict()``.

Its tensors are transformers' ``EetqLinear`` names: ``weight`` (int8), ``weight_scales`` (float16, one per output
row) and ``bias``, plus ``weight_layout``, a uint8 scalar saying how ``weight`` is laid out (see
:mod:`qcore_eetq.quantize`). ``state_dict()`` always holds plain rows, whatever layout the kernel uses in memory.

Without the eetq package's GEMM the matmul is qcore's kernel layer: an :class:`qcore.kernels.Int8Weight` over the
same rows and scales. Where its kernel keeps the codes in a layout of its own (two int4 halves on CPU), that is the
only copy: ``weight`` becomes a placeholder of the same shape and dtype holding one byte, and ``state_dict()``
reads the rows back from the kernel layer exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from qcore.kernels import Int8Weight
from torch import nn

from qcore_eetq.environment import KernelChoice, eetq_kernels
from qcore_eetq.quantize import EETQ_KERNEL, ROWS, dequantize, eetq_layout, quantize, rows_from_eetq_layout

__all__ = ["EetqLinear", "quantize_weight", "restore", "dequantized"]


class EetqLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q``; the matmul is the kernel :meth:`use_kernel` chose."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, transposed_checkpoint: bool
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        #: A transformers ``Conv1D`` stores its full-precision weight as [in, out]; quantizing transposes it first.
        self.transposed_checkpoint = transposed_checkpoint
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scales = nn.Parameter(torch.empty(out_features, dtype=torch.float16), requires_grad=False)
        self.register_buffer("weight_layout", torch.empty((), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        #: Until phase 6 chooses, the kernel that runs everywhere.
        self.kernel = "dequantize"
        #: The kernel layer's weight once phase 6 has chosen one of its kernels.
        self.packed: Int8Weight | None = None

    @classmethod
    def replacing(cls, module: nn.Module, dtype: torch.dtype) -> EetqLinear:
        """An empty ``EetqLinear`` (create it under ``torch.device("meta")``) with the shape of ``module``."""
        transposed = not isinstance(module, nn.Linear)  # transformers' Conv1D: weight is [in, out]
        in_features, out_features = module.weight.shape if transposed else module.weight.shape[::-1]
        return cls(in_features, out_features, module.bias is not None, dtype, transposed)

    def use_kernel(self, choice: KernelChoice, dtype: torch.dtype) -> KernelChoice:
        """Switch to ``choice``'s kernel for ``dtype`` activations, converting ``weight`` to the layout it reads
        (phase 6), and return the kernel that runs: ``torch`` lets the kernel layer pick, any other kernel layer name
        forces that kernel."""
        if choice.kernel == "eetq":
            # The only copy of the weight becomes eetq's layout: holding both would double the weight memory.
            self.weight = nn.Parameter(eetq_layout(self.weight, eetq_kernels()), requires_grad=False)
            self.weight_layout = torch.tensor(EETQ_KERNEL, dtype=torch.uint8, device=self.weight.device)
            self.kernel = "eetq"
            return choice
        packed = Int8Weight.from_codes(self.weight.detach(), self.weight_scales.detach())
        forced = None if choice.kernel == "torch" else choice.kernel
        self.kernel = packed.select(self.weight.device, dtype, batch_hint=1, kernel=forced)
        if self.kernel in ("int8pack", "dequantize"):
            # These read plain rows (an aligned copy where the stored ones were misaligned): hold that tensor.
            self.weight = nn.Parameter(packed.codes(), requires_grad=False)
        else:
            placeholder = torch.zeros((), dtype=torch.int8, device=self.weight.device)
            self.weight = nn.Parameter(placeholder.expand(self.out_features, self.in_features), requires_grad=False)
        self.packed = packed
        return KernelChoice(self.kernel, "; ".join(filter(None, (choice.reason, "" if forced else packed.reason))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.matmul(x, self.bias)
        if self.kernel == "dequantize":
            return F.linear(x, dequantize(self.weight, self.weight_scales, x.dtype), self.bias)
        if x.dtype != torch.float16:
            raise TypeError(f"the eetq kernel takes float16 activations, got {x.dtype}; load with dtype=torch.float16")
        rows = x.reshape(-1, self.in_features)
        out = eetq_kernels().w8_a16_gemm(rows.contiguous(), self.weight, self.weight_scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel == "eetq":
            destination[prefix + "weight"] = rows_from_eetq_layout(self.weight.detach(), eetq_kernels())
            destination[prefix + "weight_layout"] = torch.tensor(ROWS, dtype=torch.uint8, device=self.weight.device)
        elif self.packed is not None:
            destination[prefix + "weight"] = self.packed.codes()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}"
        )


def dequantized(layer: EetqLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain ``weight`` (``[out, in]``, or ``[in, out]`` for a ``Conv1D``) and ``bias`` of ``layer``: its int8
    rows times its float16 scales (:func:`~qcore_eetq.quantize.dequantize`), the rows read back from whichever
    layout the kernel holds them in, as ``state_dict()`` reads them. New tensors in ``dtype``; the layer is unchanged.
    """
    if layer.kernel == "eetq":
        rows = rows_from_eetq_layout(layer.weight.detach(), eetq_kernels())
    elif layer.packed is not None:
        rows = layer.packed.codes()
    else:
        rows = layer.weight.detach()
    weight = dequantize(rows, layer.weight_scales.detach(), dtype)
    tensors = {"weight": weight.t().contiguous() if layer.transposed_checkpoint else weight}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().to(dtype=dtype, copy=True)
    return tensors


def quantize_weight(
    layer: EetqLinear, module_name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, source: str
):
    """The attributes of ``layer`` made from its full-precision checkpoint weight (phase 4, quantizing).

    The tensor is cast to the model dtype first, as transformers does, and quantized on its target device.

    :raises qcore.CheckpointError: a row that float16 scales cannot represent (NaN/inf, or ``|w| > 127 * 65504``).
    """
    from qcore import CheckpointError

    weight = tensor.to(device=device, dtype=dtype)
    q, scale = quantize(weight.t().contiguous() if layer.transposed_checkpoint else weight)
    bad = (~torch.isfinite(scale)).nonzero().flatten().tolist()
    if bad:
        raise CheckpointError(
            f"output row(s) {bad[:5]} hold NaN/inf or values beyond what a float16 scale can represent "
            f"(|w| > {127 * 65504}); keep this module in full precision with modules_to_not_convert",
            file=source,
            tensor=f"{module_name}.weight",
        )
    return {
        "weight": nn.Parameter(q, requires_grad=False),
        "weight_scales": nn.Parameter(scale, requires_grad=False),
        "weight_layout": torch.tensor(ROWS, dtype=torch.uint8, device=device),
    }


def restore(layer: EetqLinear, module_name: str, stored: dict[str, torch.Tensor], device: torch.device, source: str):
    """The attributes of ``layer`` rebuilt from its saved tensors (phase 4, pre-quantized checkpoint).

    :raises qcore.CheckpointError: a checkpoint in eetq's GPU layout (transformers writes those), an unknown layout,
        or tensors of the wrong dtype or shape, naming the tensor.
    """
    from qcore import CheckpointError

    def refuse(tensor_name: str, message: str) -> CheckpointError:
        return CheckpointError(message, file=source, tensor=f"{module_name}.{tensor_name}")

    if "weight" in stored and stored["weight"].is_floating_point():
        raise refuse(
            "weight",
            f"is stored in full precision ({stored['weight'].dtype}) but the checkpoint's quantization_config "
            f"quantizes this module; add it to modules_to_not_convert in config.json",
        )
    if "weight_layout" not in stored:
        raise refuse(
            "weight",
            "an EETQ checkpoint without 'weight_layout' tensors, as transformers writes it: its int8 weights are in "
            "the eetq CUDA kernel's interleaved layout, which depends on the GPU architecture that wrote it and is not "
            "recorded, so it cannot be converted safely. Quantize the full-precision checkpoint with qcore instead: "
            "qcore.from_pretrained(<full-precision model>, {'quant_method': 'eetq'})",
        )
    unknown = sorted(set(stored) - {"weight", "weight_scales", "weight_layout"})
    if unknown:
        raise refuse(unknown[0], f"unexpected EETQ tensor(s) {unknown}; expected weight, weight_scales, weight_layout")
    layout = stored["weight_layout"]
    if layout.dtype != torch.uint8 or layout.dim() != 0 or int(layout) != ROWS:
        raise refuse(
            "weight_layout",
            f"weight layout {layout.tolist()} ({layout.dtype}, shape {list(layout.shape)}) is not plain rows (a uint8 "
            f"scalar {ROWS}), the only layout "
            f"qcore-eetq reads; the checkpoint was written by something else, or is corrupt",
        )
    expected = {
        "weight": (torch.int8, (layer.out_features, layer.in_features)),
        "weight_scales": (torch.float16, (layer.out_features,)),
    }
    for name, (dtype, shape) in expected.items():
        if name not in stored:
            raise refuse(name, "missing; the checkpoint is incomplete")
        tensor = stored[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise refuse(name, f"is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape} for this module")
    return {
        "weight": nn.Parameter(stored["weight"].to(device), requires_grad=False),
        "weight_scales": nn.Parameter(stored["weight_scales"].to(device), requires_grad=False),
        "weight_layout": layout.reshape(()).to(device),
    }
