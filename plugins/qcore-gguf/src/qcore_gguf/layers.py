"""``GgufLinear``, the module that replaces each owned ``nn.Linear``/``Conv1D``: made empty on meta in phase 3, filled
with its GGUF blocks in phase 4, given its kernel in phase 6, saved by its ``state_dict()`` and dequantized by the
``dequantize_module`` hook.

Saved layout (safetensors, no pickle), per module:

* ``weight``: uint8 ``[out_features, bytes_per_row]``, each row the GGUF blocks of one output feature exactly as the
  file stores them (Llama q/k rows un-permuted; for F32/F16/BF16 the values' little-endian bytes). The layout of
  transformers' own ``GgufLinear``.
* ``weight_type``: uint8 scalar, the ggml type id (``GGMLQuantizationType``: 2 = Q4_0, 12 = Q4_K, ...).
* ``bias``: in the model dtype, when the module has one.

Q4_0, Q4_1 and Q8_0 are group-32 integers, so their blocks become a ``qcore.kernels`` weight in phase 4 (the file's
bytes are then dropped, and ``state_dict()`` re-encodes the identical bytes from the kernel's exact codes and
statistics); every other type is dequantized from its blocks in each forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcore_gguf import blocks

__all__ = ["GgufLinear"]


class GgufLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held as GGUF blocks, or as the ``qcore.kernels`` weight they map onto."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, transposed: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        #: A transformers ``Conv1D`` (GPT-2) keeps its float weight as [in, out]; its blocks are rows of outputs.
        self.transposed = transposed
        self.weight = nn.Parameter(torch.empty(out_features, 0, dtype=torch.uint8), requires_grad=False)
        self.register_buffer("weight_type", torch.empty((), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        #: The block type's name, and the kernel-layer weight that replaces the blocks of Q4_0/Q4_1/Q8_0.
        self.type_name = ""
        self.packed = None

    @classmethod
    def replacing(cls, module: nn.Module, dtype: torch.dtype) -> GgufLinear:
        """An empty ``GgufLinear`` (create it under ``torch.device("meta")``) with the shape of ``module``."""
        transposed = not isinstance(module, nn.Linear)
        in_features, out_features = module.weight.shape if transposed else module.weight.shape[::-1]
        return cls(in_features, out_features, module.bias is not None, dtype, transposed)

    def filled(self, rows: torch.Tensor, type_name: str, device: torch.device) -> dict[str, object]:
        """The attributes that hold ``rows`` (uint8 blocks, already checked) of type ``type_name`` on ``device``."""
        from qcore.kernels import Int4Weight, Int8Weight

        packed = None
        form = blocks.int_form(rows.to(device), type_name)
        if form is not None:
            codes, scale, zero = form
            kind = Int8Weight if type_name == "Q8_0" else Int4Weight
            # The GGUF scale is a half, kept as one: exact, and half the memory of float32.
            candidate = kind.from_codes(codes, scale.to(torch.float16), zero, group_size=32)
            if torch.equal(self._encode(candidate, type_name).cpu(), rows.cpu()):
                packed = candidate
        return {
            "weight": None if packed is not None else nn.Parameter(rows.to(device), requires_grad=False),
            "weight_type": torch.tensor(blocks.ID[type_name], dtype=torch.uint8, device=device),
            "type_name": type_name,
            "packed": packed,
        }

    @staticmethod
    def _encode(packed, type_name: str) -> torch.Tensor:
        return blocks.from_int_form(packed.codes(), packed.scale, packed.zero, type_name)

    def blocks(self) -> torch.Tensor:
        """The GGUF blocks of the weight, ``[out_features, bytes_per_row]`` uint8, exactly as stored."""
        return self._encode(self.packed, self.type_name) if self.packed is not None else self.weight

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``W`` as ``[out_features, in_features]`` in ``dtype``: the GGUF values, in float32, rounded once."""
        return blocks.dequantize(self.blocks(), self.type_name, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.matmul(x, self.bias)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:
            destination[prefix + "weight"] = self.blocks()

    def extra_repr(self) -> str:
        kernel = self.packed.kernel if self.packed is not None else "dequantize"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"type={self.type_name}, kernel={kernel}"
        )
